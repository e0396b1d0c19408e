//! The envelope decoder against arbitrary bytes: it must return an error or
//! a message, never panic, hang or allocate without bound; and whatever it
//! accepts must survive an encode/decode round trip unchanged.
#![no_main]

use bus_file::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::decode(data) {
        let bytes = envelope.encode();
        let again = Envelope::decode(&bytes).expect("an encoded envelope decodes");
        assert_eq!(again.encode(), bytes, "the round trip is stable");
    }
});
