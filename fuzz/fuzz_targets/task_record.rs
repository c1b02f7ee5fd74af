//! Fuzz target: arbitrary bytes decoded as a stored task record.
//! Fails on a panic, or on an error that does not name what is corrupt, or when decode and
//! encode disagree (see `omniq::fuzzing::check`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use omniq::fuzzing::{check, Target};

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = check(Target::TaskRecord, data) {
        panic!("{violation}");
    }
});
