//! Property tests of the on-disk envelope: whatever a publisher can put in
//! a message comes back exactly, and no corruption is ever read as a
//! message.

use bus_core::{Bytes, DeliveryMode, FieldTable, FieldValue, Message, Properties};
use bus_file::Envelope;
use proptest::prelude::*;

fn field_value() -> impl Strategy<Value = FieldValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        (-1e30f32..1e30).prop_map(FieldValue::F32),
        (-1e300f64..1e300).prop_map(FieldValue::F64),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| FieldValue::Decimal { scale, value }),
        ".{0,12}".prop_map(FieldValue::String),
        proptest::collection::vec(any::<u8>(), 0..16)
            .prop_map(|b| FieldValue::Bytes(Bytes::from(b))),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6).prop_map(FieldValue::Table),
        ]
    })
}

fn properties() -> impl Strategy<Value = Properties> {
    let s = || proptest::option::of(".{0,16}");
    (
        (
            s(),
            s(),
            proptest::collection::btree_map(".{0,8}", field_value(), 0..6),
        ),
        (
            proptest::option::of(prop_oneof![
                Just(DeliveryMode::Transient),
                Just(DeliveryMode::Persistent)
            ]),
            proptest::option::of(any::<u8>()),
            s(),
            s(),
            s(),
        ),
        (s(), proptest::option::of(any::<u64>()), s(), s(), s()),
    )
        .prop_map(
            |(
                (content_type, content_encoding, headers),
                (delivery_mode, priority, correlation_id, reply_to, expiration),
                (message_id, timestamp, kind, user_id, app_id),
            )| Properties {
                content_type,
                content_encoding,
                headers: headers.into_iter().collect::<FieldTable>(),
                delivery_mode,
                priority,
                correlation_id,
                reply_to,
                expiration,
                message_id,
                timestamp,
                kind,
                user_id,
                app_id,
            },
        )
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        ".{0,20}",
        ".{0,20}",
        any::<i64>(),
        properties(),
        proptest::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(
            |(exchange, routing_key, published_at_ms, properties, body)| Envelope {
                exchange,
                routing_key,
                published_at_ms,
                message: Message {
                    body: Bytes::from(body),
                    properties: properties.into(),
                },
            },
        )
}

proptest! {
    #[test]
    fn envelopes_round_trip_exactly(e in envelope()) {
        let bytes = e.encode();
        prop_assert_eq!(Envelope::decode(&bytes).expect("decodes"), e);
    }

    #[test]
    fn a_torn_write_is_never_a_message(e in envelope(), cut in any::<prop::sample::Index>()) {
        let bytes = e.encode();
        let n = cut.index(bytes.len());
        prop_assert!(Envelope::decode(&bytes[..n]).is_err());
    }

    #[test]
    fn a_flipped_byte_is_never_a_message(e in envelope(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut bytes = e.encode();
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        prop_assert!(Envelope::decode(&bytes).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&bytes);
    }
}
