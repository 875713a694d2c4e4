//! The load generator: see BENCHMARKS.md. (Being written.)

mod common;

fn main() {
    let _ = common::stores();
}
