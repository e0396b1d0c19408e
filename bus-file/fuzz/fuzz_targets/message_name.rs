//! Message file-name parsing against arbitrary names: never a panic, and
//! what parses round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = std::str::from_utf8(data) {
        bus_file::fuzzing::message_name(name);
    }
});
