//! The agent's collection controller inputs (FIG 13 step 1304-1308): CPU and
//! memory from /proc and cgroup v2, or synthetic readings. The parsers are
//! pure functions of file contents so they are tested on fixtures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// One reading, before it is stamped into a [`Sample`](crate::Sample).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// CPU busy fraction 0-1 over the window.
    pub cpu: f64,
    /// Available memory, bytes.
    pub mem_available: u64,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// CPUs available.
    pub cpus: f64,
}

/// Something that measures: /proc, or a script.
pub trait Collector: Send {
    /// Takes a reading; `since_start` is the time since the agent started.
    ///
    /// # Errors
    /// When the source cannot be read (the agent logs it and keeps the last sample).
    fn read(&mut self, since_start: Duration) -> Result<Reading>;
}

/// Cumulative CPU jiffies from the first line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Busy jiffies: everything but idle and iowait.
    pub busy: u64,
    /// All jiffies.
    pub total: u64,
}

/// Parses /proc/stat: the aggregate `cpu` line and the number of `cpuN` lines.
#[must_use]
pub fn parse_proc_stat(text: &str) -> Option<(CpuTimes, u32)> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut fields = first.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum(); // guest time is already in user/nice
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    Some((
        CpuTimes {
            busy: total.saturating_sub(idle),
            total,
        },
        cpus.max(1),
    ))
}

/// Parses /proc/meminfo: `(MemAvailable, MemTotal)` in bytes.
#[must_use]
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
    };
    Some((field("MemAvailable")?, field("MemTotal")?))
}

/// Parses cgroup v2 `cpu.max` ("max 100000" or "200000 100000") into CPUs.
#[must_use]
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut f = text.split_ascii_whitespace();
    let quota = f.next()?;
    let period: f64 = f.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

/// Parses `usage_usec` from cgroup v2 `cpu.stat`.
#[must_use]
pub fn parse_cpu_stat_usage(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

/// Parses cgroup v2 `memory.max` ("max" means no limit).
#[must_use]
pub fn parse_memory_max(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" { None } else { t.parse().ok() }
}

/// Finds this process's cgroup v2 directory from /proc/self/cgroup (`0::/path`).
#[must_use]
pub fn own_cgroup(proc_self_cgroup: &str, mount: &Path) -> Option<PathBuf> {
    let rel = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// Reads the host's (or a cgroup's) real CPU and memory.
#[derive(Debug)]
pub struct ProcCollector {
    proc_root: PathBuf,
    cgroup: Option<PathBuf>,
    prev: Option<(CpuTimes, Option<u64>, std::time::Instant)>,
}

impl ProcCollector {
    /// Reads `/proc`, and the cgroup v2 directory `cgroup` if given (else
    /// the agent's own cgroup when it has limits).
    #[must_use]
    pub fn new(cgroup: Option<PathBuf>) -> Self {
        let cgroup = cgroup.or_else(|| {
            let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
            own_cgroup(&text, Path::new("/sys/fs/cgroup"))
        });
        ProcCollector {
            proc_root: PathBuf::from("/proc"),
            cgroup,
            prev: None,
        }
    }

    fn cg(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.cgroup.as_ref()?.join(file)).ok()
    }
}

impl Collector for ProcCollector {
    fn read(&mut self, _since_start: Duration) -> Result<Reading> {
        let stat = std::fs::read_to_string(self.proc_root.join("stat"))?;
        let (times, host_cpus) = parse_proc_stat(&stat)
            .ok_or_else(|| Error::Malformed("unreadable /proc/stat".into()))?;
        let meminfo = std::fs::read_to_string(self.proc_root.join("meminfo"))?;
        let (mut avail, mut total) = parse_meminfo(&meminfo)
            .ok_or_else(|| Error::Malformed("no MemAvailable in /proc/meminfo".into()))?;
        // The cgroup's memory limit, when it binds tighter than the host's.
        if let Some(limit) = self.cg("memory.max").as_deref().and_then(parse_memory_max) {
            let used: u64 = self
                .cg("memory.current")
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            avail = avail.min(limit.saturating_sub(used));
            total = total.min(limit);
        }
        let quota = self.cg("cpu.max").as_deref().and_then(parse_cpu_max);
        let usage = self
            .cg("cpu.stat")
            .as_deref()
            .and_then(parse_cpu_stat_usage);
        let now = std::time::Instant::now();
        let mut cpu = 0.0;
        if let Some((prev, prev_usage, at)) = self.prev {
            let dt = times.total.saturating_sub(prev.total);
            if dt > 0 {
                cpu = times.busy.saturating_sub(prev.busy) as f64 / dt as f64;
            }
            // Under a CPU quota the cgroup is busy when it uses its quota,
            // however idle the host is.
            if let (Some(q), Some(u), Some(pu)) = (quota, usage, prev_usage) {
                let wall_us = now.duration_since(at).as_micros() as f64;
                if wall_us > 0.0 && q < f64::from(host_cpus) {
                    cpu = cpu.max(u.saturating_sub(pu) as f64 / (wall_us * q));
                }
            }
        }
        self.prev = Some((times, usage, now));
        Ok(Reading {
            cpu: cpu.clamp(0.0, 1.0),
            mem_available: avail,
            mem_total: total,
            cpus: quota.map_or(f64::from(host_cpus), |q| q.min(f64::from(host_cpus))),
        })
    }
}

/// Readings from a script instead of /proc, for the test bed and tests.
///
/// The spec is one reading (`cpu=12%,mem=60456KB`) or a script of readings
/// held from a time on (`0s:cpu=10%,mem=2GB;5s:cpu=90%,mem=2GB`); `mem` takes
/// B, KB, MB, GB (binary: 1 KB = 1024 bytes), `total` may be given too
/// (default: 4 × mem), and `cpus` (default 1).
#[derive(Debug, Clone)]
pub struct Synthetic {
    steps: Vec<(Duration, Reading)>,
}

impl Synthetic {
    /// Parses a spec.
    ///
    /// # Errors
    /// [`Error::Synthetic`] naming what is wrong.
    pub fn parse(spec: &str) -> Result<Synthetic> {
        let bad = |reason| Error::Synthetic {
            spec: spec.to_owned(),
            reason,
        };
        let mut steps = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (at, reading) = match part.split_once(':') {
                Some((t, r)) => (parse_duration(t).ok_or(bad("invalid time before ':'"))?, r),
                None => (Duration::ZERO, part),
            };
            let (mut cpu, mut mem, mut total, mut cpus) = (None, None, None, 1.0);
            for kv in reading.split(',').map(str::trim) {
                let (k, v) = kv.split_once('=').ok_or(bad("expected key=value"))?;
                match k.trim() {
                    "cpu" => {
                        let p: f64 = v
                            .trim()
                            .trim_end_matches('%')
                            .parse()
                            .map_err(|_| bad("cpu is not a number"))?;
                        if !(0.0..=100.0).contains(&p) {
                            return Err(bad("cpu must be 0-100%"));
                        }
                        cpu = Some(p / 100.0);
                    }
                    "mem" => mem = Some(parse_bytes(v).ok_or(bad("invalid mem"))?),
                    "total" => total = Some(parse_bytes(v).ok_or(bad("invalid total"))?),
                    "cpus" => cpus = v.trim().parse().map_err(|_| bad("invalid cpus"))?,
                    _ => return Err(bad("unknown key (cpu, mem, total, cpus)")),
                }
            }
            let (cpu, mem) = (
                cpu.ok_or(bad("missing cpu"))?,
                mem.ok_or(bad("missing mem"))?,
            );
            steps.push((
                at,
                Reading {
                    cpu,
                    mem_available: mem,
                    mem_total: total.unwrap_or(mem.saturating_mul(4)).max(mem),
                    cpus,
                },
            ));
        }
        if steps.is_empty() {
            return Err(bad("no reading"));
        }
        if steps.windows(2).any(|w| w[1].0 <= w[0].0) {
            return Err(bad("times must increase"));
        }
        if steps[0].0 != Duration::ZERO {
            return Err(bad("the first reading must start at 0s"));
        }
        Ok(Synthetic { steps })
    }

    /// The reading in force at `t`.
    #[must_use]
    pub fn at(&self, t: Duration) -> Reading {
        self.steps
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .unwrap_or(&self.steps[0])
            .1
    }
}

impl Collector for Synthetic {
    fn read(&mut self, since_start: Duration) -> Result<Reading> {
        Ok(self.at(since_start))
    }
}

/// `500ms`, `2s`, `1.5s`, `3m`, `1h`.
#[must_use]
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v * mult))
}

/// `123`, `60456KB`, `10MB`, `2GB` (binary multiples).
#[must_use]
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let upper = s.to_ascii_uppercase();
    let (num, mult) = [
        ("KIB", 1u64 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("KB", 1 << 10),
        ("MB", 1 << 20),
        ("GB", 1 << 30),
        ("K", 1 << 10),
        ("M", 1 << 20),
        ("G", 1 << 30),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| upper.strip_suffix(suf).map(|n| (n.to_owned(), *m)))
    .unwrap_or((upper.clone(), 1));
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\ncpu1 50 3 25 400 10 2 1 0 0 0\nintr 12345\n";

    #[test]
    fn proc_stat() {
        let (t, n) = parse_proc_stat(STAT).unwrap();
        assert_eq!(n, 2);
        assert_eq!(t.total, 980);
        assert_eq!(t.busy, 980 - 820);
        assert_eq!(parse_proc_stat("intr 1\n"), None);
    }

    #[test]
    fn meminfo() {
        let m = "MemTotal:       16314708 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(
            parse_meminfo(m),
            Some((12_000_000 * 1024, 16_314_708 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn cgroup_files() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(
            parse_cpu_stat_usage("usage_usec 123456\nuser_usec 1\n"),
            Some(123_456)
        );
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("1073741824\n"), Some(1 << 30));
        assert_eq!(
            own_cgroup(
                "0::/system.slice/kamailio.service\n",
                Path::new("/sys/fs/cgroup")
            ),
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/kamailio.service"
            ))
        );
    }

    #[test]
    fn real_proc_reads_and_is_sane() {
        let mut c = ProcCollector::new(None);
        let a = c.read(Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.read(Duration::from_millis(20)).unwrap();
        assert!(a.mem_available > 0 && a.mem_available <= a.mem_total);
        assert!((0.0..=1.0).contains(&b.cpu));
        assert!(b.cpus >= 1.0 - 1e-9);
    }

    #[test]
    fn synthetic_specs() {
        let s = Synthetic::parse("cpu=1%,mem=60456KB").unwrap();
        let r = s.at(Duration::from_secs(100));
        assert!((r.cpu - 0.01).abs() < 1e-12);
        assert_eq!(r.mem_available, 60_456 * 1024);
        let s =
            Synthetic::parse("0s:cpu=10%,mem=1GB; 5s:cpu=90%,mem=1GB,total=2GB,cpus=4").unwrap();
        assert!((s.at(Duration::from_secs(4)).cpu - 0.1).abs() < 1e-12);
        let late = s.at(Duration::from_secs(5));
        assert!((late.cpu - 0.9).abs() < 1e-12);
        assert_eq!((late.mem_total, late.cpus), (2 << 30, 4.0));
        for bad in [
            "",
            "cpu=1%",
            "mem=1GB",
            "cpu=200%,mem=1",
            "cpu=x,mem=1",
            "1s:cpu=1%,mem=1",
            "0s:cpu=1%,mem=1;0s:cpu=2%,mem=1",
            "cpu=1%,mem=1,disk=2",
        ] {
            let e = Synthetic::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("invalid synthetic readings"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn units() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_bytes("10MB"), Some(10 << 20));
        assert_eq!(parse_bytes("10MiB"), Some(10 << 20));
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("x"), None);
    }
}
