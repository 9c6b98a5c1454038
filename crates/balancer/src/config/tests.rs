//! Config parsing and validation: every error names its field.
use super::*;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

const GOOD: &str = r#"
[routing]
secret = "0123456789abcdef0123"
[perf]
key_file = "agent.key"
[[servers]]
id = "s1"
address = "127.0.0.1:5081"
agent = "127.0.0.1:7071"
[[servers]]
id = "s2"
address = "127.0.0.1:5082"
transport = "tcp"
agent = "127.0.0.1:7072"
"#;

#[test]
fn defaults() {
    let c = Config::parse(GOOD, &base()).unwrap();
    assert_eq!(c.listen, default_listen());
    assert_eq!(c.advertise_host, "127.0.0.1");
    assert_eq!(c.advertise_port, 5060);
    assert_eq!(c.stale_after, Duration::from_millis(1500));
    assert_eq!(c.servers[1].transport, Transport::Tcp);
    assert_eq!(
        c.admin.as_ref().map(|a| a.listen),
        Some("127.0.0.1:8060".parse().unwrap())
    );
    assert!(
        c.admin
            .as_ref()
            .is_some_and(|a| a.token.is_none() && !a.auth_reads)
    );
    assert_eq!(c.register, RegisterMode::Fork);
    assert_eq!(c.policy, "adaptive");
    assert_eq!(c.outlier, crate::outlier::OutlierConfig::default());
}

#[test]
fn pools_without_agents_take_an_agentless_policy() {
    let text = GOOD
        .replace("agent = \"127.0.0.1:7072\"", "capacity = 300")
        .replace("[routing]", "[routing]\npolicy = \"p2c\"");
    let c = Config::parse(&text, &base()).unwrap();
    assert_eq!(c.servers[1].agent, None);
    assert_eq!(c.servers[1].capacity, Some(300.0));
    let e = Config::parse(&text.replace("\"p2c\"", "\"adaptive\""), &base()).unwrap_err();
    assert_eq!(e.field, "servers[1].agent");
}

#[test]
fn the_example_config_is_valid() {
    let p = base().join("local.toml");
    let c = Config::load(&p).unwrap();
    assert_eq!(c.servers.len(), 2);
}

/// A fresh folder with `files` in it, for configs naming files.
fn folder(files: &[(&str, &str)]) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "siplb-config-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    for (name, text) in files {
        std::fs::write(d.join(name), text).unwrap();
    }
    d
}

/// `GOOD` with the agent key named absolutely and `admin` as its `[admin]`.
fn with_admin(admin: &str) -> String {
    GOOD.replace(
        "key_file = \"agent.key\"",
        &format!("key_file = \"{}\"", base().join("agent.key").display()),
    ) + "\n[admin]\n"
        + admin
}

#[test]
fn the_admin_token_file_is_read_relative_to_the_config() {
    let d = folder(&[("admin.token", "  0123456789abcdef-token \n")]);
    let c = Config::parse(
        &with_admin("token_file = \"admin.token\"\nauth_reads = true\n"),
        &d,
    )
    .unwrap();
    let a = c.admin.as_ref().unwrap();
    assert!(a.auth_reads);
    let t = a.token.as_ref().unwrap();
    assert_eq!(t.expose(), "0123456789abcdef-token");
    assert!(t.matches(b"0123456789abcdef-token"));
    assert!(!t.matches(b"0123456789abcdef-toke"));
    assert!(!t.matches(b""));
    assert!(
        !format!("{c:?}").contains("0123456789abcdef-token"),
        "Debug shows the token"
    );
    // siplb status reads the [admin] section alone: no secret needed.
    std::fs::write(
        d.join("lb.toml"),
        "[admin]\nlisten = \"0.0.0.0:9000\"\ntoken_file = \"admin.token\"\n",
    )
    .unwrap();
    let a = Config::load_admin(&d.join("lb.toml")).unwrap().unwrap();
    assert_eq!(a.listen, "0.0.0.0:9000".parse().unwrap());
    assert!(a.token.unwrap().matches(b"0123456789abcdef-token"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn admin_fields_are_checked() {
    let d = folder(&[
        ("short.token", "0123456789abcde\n"),
        ("two.token", "0123456789abcdef 0123456789abcdef\n"),
    ]);
    let cases = [
        (
            "token_file = \"short.token\"",
            "admin.token_file",
            "16 bytes",
        ),
        (
            "token_file = \"two.token\"",
            "admin.token_file",
            "no spaces",
        ),
        (
            "token_file = \"missing.token\"",
            "admin.token_file",
            "missing.token",
        ),
        ("auth_reads = true", "admin.auth_reads", "token_file"),
        (
            "allowed_hosts = [\"lb1.example\", \"http://x\"]",
            "admin.allowed_hosts[1]",
            "scheme",
        ),
        (
            "allowed_hosts = [\"*.example\"]",
            "admin.allowed_hosts[0]",
            "wildcard",
        ),
        (
            "allowed_hosts = [\"a.example/admin\"]",
            "admin.allowed_hosts[0]",
            "path",
        ),
        ("allowed_hosts = [\"\"]", "admin.allowed_hosts[0]", "host"),
        (
            "allowed_hosts = [\"::1\"]",
            "admin.allowed_hosts[0]",
            "host",
        ),
        (
            "allowed_hosts = [\"a.example:99999\"]",
            "admin.allowed_hosts[0]",
            "port",
        ),
        // A serde error names the field too (the path where it stopped).
        ("token = \"inline\"", "admin.token", "unknown field `token`"),
    ];
    for (admin, field, reason) in cases {
        let e = Config::parse(&with_admin(admin), &d).unwrap_err();
        assert_eq!(e.field, field, "{admin}: {e}");
        assert!(e.reason.contains(reason), "{admin}: {e}");
    }
    let c = Config::parse(
        &with_admin("allowed_hosts = [\"LB1.Mgmt.Example\", \"10.0.0.5:8060\", \"[::1]:8060\"]"),
        &d,
    )
    .unwrap();
    assert_eq!(
        c.admin.unwrap().allowed_hosts,
        ["lb1.mgmt.example", "10.0.0.5:8060", "[::1]:8060"]
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            GOOD.replace("address = \"127.0.0.1:5082\"", "address = \"nowhere\""),
            "servers[1].address",
        ),
        (
            GOOD.replace("secret = \"0123456789abcdef0123\"", "secret = \"short\""),
            "routing.secret",
        ),
        (GOOD.replace("id = \"s2\"", "id = \"s1\""), "servers[1].id"),
        (
            GOOD.replace("agent = \"127.0.0.1:7072\"", ""),
            "servers[1].agent",
        ),
        (
            GOOD.replace("key_file = \"agent.key\"", "key_file = \"missing.key\""),
            "perf.key_file",
        ),
        (
            format!("{GOOD}\n[scoring]\ncpu_max = 2.0\n"),
            "scoring.cpu_max",
        ),
        (
            GOOD.replace("[perf]", "[perf]\npoll_interval = \"soon\""),
            "perf.poll_interval",
        ),
        (
            GOOD.replace("transport = \"tcp\"", "transport = \"tcp\"\ncapacity = 0"),
            "servers[1].capacity",
        ),
        (
            GOOD.replace("[routing]", "[routing]\nslow_start = \"later\""),
            "routing.slow_start",
        ),
        (
            GOOD.replace("[routing]", "[routing]\nmax_ejection_time = \"1s\""),
            "routing.max_ejection_time",
        ),
        (
            GOOD.replace("[routing]", "[routing]\nmax_ejected_percent = 101"),
            "routing.max_ejected_percent",
        ),
        (
            GOOD.replace("[routing]", "[routing]\nslow_start_floor = 1.5"),
            "routing.slow_start_floor",
        ),
        (
            GOOD.replace(
                "[routing]",
                "[routing]\nregister = \"registrar\"\nregistrar = \"s9\"",
            ),
            "routing.registrar",
        ),
        (
            GOOD.replace("[routing]", "[routing]\npolicy = \"fastest\""),
            "routing.policy",
        ),
        (
            GOOD.replace("[routing]", "[routing]\nbogus = 1"),
            "routing.bogus",
        ),
        (
            GOOD.replace("transport = \"tcp\"", "transport = \"sctp\""),
            "servers[1].transport",
        ),
        (
            GOOD.replace("[perf]", "[perf]\ntimeout = 5"),
            "perf.timeout",
        ),
        (GOOD.replace("[perf]", "[perf"), "config"),
    ];
    for (text, field) in cases {
        let e = Config::parse(&text, &base()).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    let e = Config::parse(&GOOD.replace("[routing]", "[routing]\nbogus = 1"), &base()).unwrap_err();
    assert!(
        e.reason.contains("bogus") && e.reason.contains("line"),
        "{e}"
    );
}

#[test]
fn overload_signals_have_defaults_and_checked_fields() {
    let c = Config::parse(GOOD, &base()).unwrap();
    assert_eq!(c.retry_after_max, Duration::from_secs(300));
    assert_eq!(c.probe_down_statuses, [503]);
    let with = |line: &str| {
        Config::parse(
            &GOOD.replace("[routing]", &format!("[routing]\n{line}")),
            &base(),
        )
    };
    let c = with("retry_after_max = \"0s\"\nprobe_down_statuses = [503, 500]").unwrap();
    assert_eq!(c.retry_after_max, Duration::ZERO);
    assert_eq!(c.probe_down_statuses, [503, 500]);
    for (line, field) in [
        ("probe_down_statuses = [180]", "routing.probe_down_statuses"),
        ("retry_after_max = \"soon\"", "routing.retry_after_max"),
        ("retry_after_max = \"25h\"", "routing.retry_after_max"),
    ] {
        assert_eq!(with(line).unwrap_err().field, field, "{line}");
    }
}

#[test]
fn servers_by_name_and_discover_entries() {
    // A server written host:port is followed in DNS under its own id.
    let text = GOOD.replace(
        "address = \"127.0.0.1:5082\"",
        "address = \"sip2.example.test:5082\"",
    );
    let c = Config::parse(&text, &base()).unwrap();
    assert_eq!(c.servers.len(), 1);
    assert_eq!(c.discover.len(), 1);
    assert_eq!(c.discover[0].source, "s2");
    assert_eq!(c.discover[0].name, "sip2.example.test");
    assert_eq!(c.discover[0].kind, DiscoverKind::Server(5082));
    assert_eq!(
        c.discover[0].template.agent.as_deref(),
        Some("127.0.0.1:7072")
    );
    assert_eq!(c.dns, DnsConfig::default());
    // [[discover]]: SRV and A/AAAA names, with an agentless policy.
    let agentless = GOOD.replace("[routing]", "[routing]\npolicy = \"round-robin\"");
    let text = format!(
        "{agentless}\n[dns]\nnameservers = [\"127.0.0.1:5353\"]\nmin_ttl = \"1s\"\n\
         [[discover]]\nid = \"pool\"\nname = \"_sip._udp.example.test\"\n\
         [[discover]]\nid = \"k8s\"\nname = \"sip.default.svc.cluster.local\"\nport = 5080\ntransport = \"tcp\"\n"
    );
    let c = Config::parse(&text, &base()).unwrap();
    assert_eq!(c.dns.nameservers, ["127.0.0.1:5353".parse().unwrap()]);
    assert_eq!(c.dns.min_ttl, Duration::from_secs(1));
    assert_eq!(c.discover[0].kind, DiscoverKind::Srv);
    assert_eq!(c.discover[1].kind, DiscoverKind::Addresses(5080));
    assert_eq!(c.discover[1].template.transport, Transport::Tcp);
    // Only discover entries: a pool all the same.
    let only = "[routing]\nsecret = \"0123456789abcdef0123\"\npolicy = \"p2c\"\n\
                [perf]\nkey_file = \"agent.key\"\n\
                [[discover]]\nid = \"pool\"\nname = \"_sip._udp.example.test\"\n";
    assert!(Config::parse(only, &base()).unwrap().servers.is_empty());
    for (edit, field) in [
        (
            "[[discover]]\nid = \"s1\"\nname = \"a.test\"",
            "discover[0].id",
        ),
        (
            "[[discover]]\nid = \"p\"\nname = \"not a name\"",
            "discover[0].name",
        ),
        (
            "[[discover]]\nid = \"p\"\nname = \"_sip._udp.a.test\"\nport = 5060",
            "discover[0].port",
        ),
        (
            "[[discover]]\nid = \"p\"\nname = \"a.test\"\ntransport = \"ws\"",
            "discover[0].transport",
        ),
        ("[dns]\nmin_ttl = \"10ms\"", "dns.min_ttl"),
        ("[dns]\nmax_ttl = \"2s\"", "dns.max_ttl"),
        ("[dns]\nnameservers = [\"localhost\"]", "dns.nameservers[0]"),
    ] {
        let e = Config::parse(&format!("{agentless}\n{edit}\n"), &base()).unwrap_err();
        assert_eq!(e.field, field, "{edit}: {e}");
    }
    // Members have no agent: a policy that needs one is refused.
    let e = Config::parse(
        &format!("{GOOD}\n[[discover]]\nid = \"p\"\nname = \"a.test\"\n"),
        &base(),
    )
    .unwrap_err();
    assert_eq!(e.field, "discover[0].name");
}

#[test]
fn capture_is_off_by_default_and_checked_field_by_field() {
    assert_eq!(Config::parse(GOOD, &base()).unwrap().capture, None);
    let with = |section: &str| Config::parse(&format!("[capture]\n{section}\n{GOOD}"), &base());
    let c = with("hep = \"127.0.0.1:9060\"").unwrap().capture.unwrap();
    assert_eq!(c.hep, "127.0.0.1:9060".parse().unwrap());
    assert_eq!(
        (c.transport, c.capture_id, c.sample, c.queue, c.password),
        (CaptureTransport::Udp, 2001, 1.0, 10_000, None)
    );
    let c = with(
        "hep = \"[::1]:9061\"\ncapture_id = 7\nsample = 0.25\nqueue = 5\npassword = \"homer\"",
    )
    .unwrap()
    .capture
    .unwrap();
    assert_eq!(
        (c.hep.port(), c.capture_id, c.sample, c.queue),
        (9061, 7, 0.25, 5)
    );
    assert_eq!(c.password.as_deref(), Some("homer"));
    for (section, field) in [
        ("hep = \"homer.example:9060\"", "capture.hep"),
        ("hep = \"127.0.0.1\"", "capture.hep"),
        ("hep = \"0.0.0.0:9060\"", "capture.hep"),
        ("hep = \"127.0.0.1:9060\"\nsample = 1.5", "capture.sample"),
        ("hep = \"127.0.0.1:9060\"\nsample = -0.1", "capture.sample"),
        ("hep = \"127.0.0.1:9060\"\nqueue = 0", "capture.queue"),
        ("hep = \"127.0.0.1:9060\"\nqueue = 100001", "capture.queue"),
        (
            "hep = \"127.0.0.1:9060\"\npassword = \"\"",
            "capture.password",
        ),
    ] {
        assert_eq!(with(section).unwrap_err().field, field, "{section}");
    }
    let e = with("hep = \"127.0.0.1:9060\"\ntransport = \"sctp\"").unwrap_err();
    assert_eq!(e.field, "capture.transport", "{e}");
}
