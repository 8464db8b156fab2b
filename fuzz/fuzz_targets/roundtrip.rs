#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::RoundtripInput;

fuzz_target!(|input: RoundtripInput| wsgate::fuzzing::roundtrip(input));
