//! The topology decoder against arbitrary bytes: an error or a topology,
//! never a panic or an unbounded allocation; what it accepts names nothing
//! invalid and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bus_file::fuzzing::topology_decode(data));
