//! The RPC wire format, pinned without a broker: bodies exactly as the
//! legacy Python peers write and read them (`msgpack.packb` / `unpackb`,
//! msgpack >= 1.0; docs/LEGACY.md, contract 1).
//!
//! Reply bytes are written by hand from the msgpack specification; request
//! bytes are compared with what `msgpack.packb` gives for the same dict
//! (the hex in the comments, produced with msgpack 1.2.4).

use bus_core::rpc::{decode_message, error_reply, remote_error, Format, ERROR_HEADER};
use bus_core::{Error, FieldValue, Message};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Params {
    beam: u32,
    temperature: f64,
}

/// A speech job as the backend sends it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u32,
    #[serde(with = "serde_bytes")]
    audio: Vec<u8>,
    language: String,
    params: Params,
    tags: Vec<String>,
    offset: i32,
    big: u32,
}

fn job() -> Job {
    Job {
        id: 12,
        audio: b"RIFF\x00\xff".to_vec(),
        language: "en".into(),
        params: Params {
            beam: 4,
            temperature: 0.5,
        },
        tags: vec!["a".into(), "b".into()],
        offset: -3,
        big: 300,
    }
}

/// msgpack.packb({'id': 12, 'audio': b'RIFF\x00\xff', 'language': 'en',
///   'params': {'beam': 4, 'temperature': 0.5}, 'tags': ['a', 'b'],
///   'offset': -3, 'big': 300}).hex()
const JOB_FROM_PYTHON: &str =
    "87a269640ca5617564696fc4065249464600ffa86c616e6775616765a2656ea6706172616d7382a4\
6265616d04ab74656d7065726174757265cb3fe0000000000000a47461677392a161a162a66f6666\
736574fda3626967cd012c";

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Segment {
    start: u32,
    end: u32,
    text: String,
}

/// A transcription reply as an algorithm worker sends it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Transcript {
    msg: String,
    segments: Vec<Segment>,
    #[serde(with = "serde_bytes")]
    pcm: Vec<u8>,
    confidence: f64,
    speaker: Option<String>,
    ok: bool,
    n: i64,
    big: u64,
}

/// The reply {'msg': 'hello from service', 'segments': [{'start': 0,
/// 'end': 1500, 'text': 'hi'}], 'pcm': b'\x00\x01\x02\xfe\xff',
/// 'confidence': 0.875, 'speaker': None, 'ok': True, 'n': -200,
/// 'big': 70000}, written by hand from the msgpack specification.
fn transcript_bytes() -> Vec<u8> {
    let mut b = vec![0x88]; // fixmap, 8 entries
    b.extend([0xa3]); // fixstr, 3 bytes
    b.extend(b"msg");
    b.extend([0xb2]); // fixstr, 18 bytes
    b.extend(b"hello from service");
    b.extend([0xa8]);
    b.extend(b"segments");
    b.extend([0x91]); // fixarray, 1 element
    b.extend([0x83]); // fixmap, 3 entries
    b.extend([0xa5]);
    b.extend(b"start");
    b.extend([0x00]); // positive fixint 0
    b.extend([0xa3]);
    b.extend(b"end");
    b.extend([0xcd, 0x05, 0xdc]); // uint 16: 1500
    b.extend([0xa4]);
    b.extend(b"text");
    b.extend([0xa2]);
    b.extend(b"hi");
    b.extend([0xa3]);
    b.extend(b"pcm");
    b.extend([0xc4, 0x05, 0x00, 0x01, 0x02, 0xfe, 0xff]); // bin 8, 5 bytes
    b.extend([0xaa]);
    b.extend(b"confidence");
    b.extend([0xcb, 0x3f, 0xec, 0, 0, 0, 0, 0, 0]); // float 64: 0.875
    b.extend([0xa7]);
    b.extend(b"speaker");
    b.extend([0xc0]); // nil
    b.extend([0xa2]);
    b.extend(b"ok");
    b.extend([0xc3]); // true
    b.extend([0xa1]);
    b.extend(b"n");
    b.extend([0xd1, 0xff, 0x38]); // int 16: -200
    b.extend([0xa3]);
    b.extend(b"big");
    b.extend([0xce, 0x00, 0x01, 0x11, 0x70]); // uint 32: 70000
    b
}

fn transcript() -> Transcript {
    Transcript {
        msg: "hello from service".into(),
        segments: vec![Segment {
            start: 0,
            end: 1500,
            text: "hi".into(),
        }],
        pcm: vec![0, 1, 2, 0xfe, 0xff],
        confidence: 0.875,
        speaker: None,
        ok: true,
        n: -200,
        big: 70_000,
    }
}

#[test]
fn hand_written_reply_is_what_python_writes() {
    // msgpack.packb(<the reply above>).hex()
    let python = "88a36d7367b268656c6c6f2066726f6d2073657276696365a87365676d656e74739183a573746172\
7400a3656e64cd05dca474657874a26869a370636dc405000102feffaa636f6e666964656e6365cb\
3fec000000000000a7737065616b6572c0a26f6bc3a16ed1ff38a3626967ce00011170";
    assert_eq!(transcript_bytes(), unhex(python));
}

#[test]
fn a_reply_without_content_type_is_decoded_as_msgpack() {
    let reply = Message::new(transcript_bytes()).with_correlation_id("c0ffee");
    assert_eq!(reply.properties.content_type, None);
    assert_eq!(remote_error(&reply), None, "a legacy reply is not an error");
    let decoded: Transcript = decode_message(&reply).expect("decode a legacy reply");
    assert_eq!(decoded, transcript());
}

#[test]
fn a_reply_says_json_by_its_content_type() {
    let reply = Message::new(serde_json::to_vec(&transcript()).unwrap())
        .with_content_type("application/json");
    assert_eq!(decode_message::<Transcript>(&reply).unwrap(), transcript());
    // The same JSON without the content type is taken as msgpack, and fails
    // as a codec error, not a panic.
    let unlabelled = Message::new(serde_json::to_vec(&transcript()).unwrap());
    assert!(matches!(
        decode_message::<Transcript>(&unlabelled),
        Err(Error::Codec(_))
    ));
}

#[test]
fn a_request_is_encoded_as_python_writes_it() {
    let request = Format::MsgPack
        .to_message(&job())
        .expect("encode a request");
    assert_eq!(
        request.properties.content_type, None,
        "msgpack requests carry no content type, as legacy ones"
    );
    assert_eq!(&request.body[..], &unhex(JOB_FROM_PYTHON)[..]);
}

#[test]
fn a_request_from_python_decodes() {
    let request = Message::new(unhex(JOB_FROM_PYTHON));
    assert_eq!(decode_message::<Job>(&request).unwrap(), job());
}

#[test]
fn structs_are_maps_with_string_keys_and_bytes_are_bin() {
    let body = Format::MsgPack.encode(&job()).unwrap();
    assert_eq!(body[0], 0x87, "a fixmap of 7 entries, not an array");
    assert_eq!(&body[1..4], &[0xa2, b'i', b'd'], "keys are str");
    assert_eq!(
        &body[5..18],
        &[0xa5, b'a', b'u', b'd', b'i', b'o', 0xc4, 6, b'R', b'I', b'F', b'F', 0],
        "a serde_bytes field is bin 8"
    );

    // The pitfall the format avoids: a Vec<u8> not marked as bytes is an
    // array of integers, which Python reads as a list.
    #[derive(Serialize)]
    struct Unmarked {
        audio: Vec<u8>,
    }
    let unmarked = Format::MsgPack
        .encode(&Unmarked { audio: vec![1, 2] })
        .unwrap();
    assert_eq!(
        unmarked,
        [0x81, 0xa5, b'a', b'u', b'd', b'i', b'o', 0x92, 1, 2]
    );
}

#[test]
fn the_legacy_demo_round_trips() {
    // The legacy demo client sends {"x": 12}; its service answers
    // {"msg": "hello from service"}.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Demo {
        x: i64,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Hello {
        msg: String,
    }
    assert_eq!(
        Format::MsgPack.encode(&Demo { x: 12 }).unwrap(),
        [0x81, 0xa1, b'x', 0x0c]
    );
    let mut hello = vec![0x81, 0xa3, b'm', b's', b'g', 0xb2];
    hello.extend(b"hello from service");
    assert_eq!(
        decode_message::<Hello>(&Message::new(hello)).unwrap(),
        Hello {
            msg: "hello from service".into()
        }
    );
}

#[test]
fn an_error_reply_stays_a_map_for_legacy_clients() {
    let reply = error_reply("boom", Format::MsgPack);
    // msgpack.packb({'error': 'boom'}).hex() == '81a56572726f72a4626f6f6d'
    assert_eq!(&reply.body[..], &unhex("81a56572726f72a4626f6f6d")[..]);
    assert_eq!(reply.properties.content_type, None);
    assert_eq!(
        reply.properties.headers.get(ERROR_HEADER),
        Some(&FieldValue::from("boom"))
    );
    assert_eq!(remote_error(&reply).as_deref(), Some("boom"));
}
