//! `spin`: run the shared benchmark loop and report its TSC cycles.
use crate::{clock, params, println, rt};
use guest_abi::{bench::spin_loop, params::*, ports::Event, BootParams};

pub fn run(p: &BootParams) -> u32 {
    rt::event(Event::BenchStart);
    let t0 = clock::rdtsc();
    let result = spin_loop(p.args.iterations, p.args.seed);
    let t1 = clock::rdtsc();
    rt::event(Event::BenchEnd);
    params::write64(OFF_BENCH_CYCLES, t1 - t0);
    params::write64(OFF_BENCH_RESULT, result);
    println!(
        "spin: {} iterations in {} us (result {:#x})",
        p.args.iterations,
        clock::ticks_to_us(t1 - t0),
        result
    );
    0
}
