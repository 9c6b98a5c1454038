//! `cargo bench -p perf`: what one agent sample costs — reading and parsing
//! /proc/stat, /proc/meminfo and the cgroup files, as the agent does every
//! interval — and the parsers alone on typical contents.

use std::time::Duration;

use divan::black_box;
use perf::collect::{Collector, ProcCollector, parse_meminfo, parse_proc_stat};

fn main() {
    divan::main();
}

#[divan::bench]
fn proc_sample(b: divan::Bencher) {
    let mut c = ProcCollector::new(None);
    b.bench_local(|| c.read(black_box(Duration::ZERO)).expect("/proc readable"));
}

#[divan::bench]
fn parse_only(b: divan::Bencher) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    b.bench_local(|| {
        (
            parse_proc_stat(black_box(&stat)),
            parse_meminfo(black_box(&meminfo)),
        )
    });
}
