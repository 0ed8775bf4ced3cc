//! The settings: layers, the environment, `_FILE` forms, every check.
use super::*;

fn base() -> config::ConfigBuilder<config::builder::DefaultState> {
    config::Config::builder().add_source(config::File::from_str(
        DEFAULT_TOML,
        config::FileFormat::Toml,
    ))
}

fn with(extra: &str) -> Result<Settings, ConfigError> {
    let s: Settings = base()
        .add_source(config::File::from_str(extra, config::FileFormat::Toml))
        .build()?
        .try_deserialize()?;
    s.validate()?;
    Ok(s)
}

const HYP: &str = r#"
    [providers.hyp_pay]
    kind = "hyp_pay"
    masof = "0010131918"
    pass_p = "secret-pass"
"#;

#[test]
fn defaults_plus_one_account_are_valid() {
    let s = with(HYP).expect("valid");
    assert_eq!(s.amqp.prefetch, 64);
    assert_eq!(s.http.addr, "127.0.0.1:8080");
    assert_eq!(s.public_url(), "http://127.0.0.1:8080");
    match &s.providers["hyp_pay"] {
        ProviderAccount::HypPay(a) => {
            assert_eq!(a.base_url, "https://pay.hyp.co.il/p/");
            // Leading zeros of the terminal number survive.
            assert_eq!(a.masof, "0010131918");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_name_the_key() {
    let err = with("[amqp]\nprefetch = 0\n")
        .expect_err("invalid")
        .to_string();
    assert!(err.contains("amqp.prefetch"), "{err}");
    let err = with("").expect_err("no providers").to_string();
    assert!(err.contains("providers"), "{err}");
    let err = with(&HYP.replace("secret-pass", ""))
        .expect_err("no pass")
        .to_string();
    assert!(err.contains("providers.hyp_pay.pass_p"), "{err}");
    let err = with(&format!("{HYP}\n[http]\naddr = \"nonsense\"\n"))
        .expect_err("bad addr")
        .to_string();
    assert!(err.contains("http.addr"), "{err}");
}

#[test]
fn environment_overrides_and_keeps_leading_zeros() {
    let env = [
        ("REFUND_WORKER__AMQP__PREFETCH", "16"),
        ("REFUND_WORKER__RETRY__DELAYED_MS", "1000,2000"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "from-env"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = Settings::load_from(None, Some(env)).expect("valid");
    assert_eq!(s.amqp.prefetch, 16);
    assert_eq!(s.retry.delayed_ms, vec![1000, 2000]);
    match &s.providers["hyp_pay"] {
        ProviderAccount::HypPay(a) => {
            assert_eq!(a.masof, "0010131918");
            assert_eq!(a.pass_p.expose(), "from-env");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn payout_settings_come_from_the_environment_as_text() {
    let s = load_env(&[
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__Z_PASS", "8179"),
        (
            "REFUND_WORKER__PROVIDERS__HYP_PAY__PAYOUTS__ENABLED",
            "true",
        ),
        (
            "REFUND_WORKER__PROVIDERS__HYP_PAY__PAYOUTS__MAX_AMOUNT_MINOR",
            "50000",
        ),
        (
            "REFUND_WORKER__PROVIDERS__HYP_PAY__PAYOUTS__DAILY_LIMIT_MINOR",
            "100000",
        ),
    ])
    .expect("valid");
    match &s.providers["hyp_pay"] {
        ProviderAccount::HypPay(a) => {
            assert!(a.payouts.enabled);
            assert_eq!(a.payouts.max_amount_minor, Some(50000));
            assert_eq!(a.payouts.daily_limit_minor, Some(100000));
            assert_eq!(a.z_pass.expose(), "8179");
        }
        other => panic!("{other:?}"),
    }
    let err = load_env(&[(
        "REFUND_WORKER__PROVIDERS__HYP_PAY__PAYOUTS__ENABLED",
        "true",
    )])
    .expect_err("no zPass")
    .to_string();
    assert!(err.contains("z_pass"), "{err}");
    let err = load_env(&[("REFUND_WORKER__PROVIDERS__HYP_PAY__PAYOUTS__ENABLD", "true")])
        .expect_err("a typo")
        .to_string();
    assert!(err.contains("payouts.enabled"), "{err}");
}

fn load_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let base = [
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "from-env"),
    ];
    let env = base
        .iter()
        .chain(pairs)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_from(None, Some(env))
}

#[test]
fn an_unknown_key_stops_start_up_naming_it_its_origin_and_the_closest_key() {
    let err = load_env(&[(
        "REFUND_WORKER__HTTP__OPERATOR_TOKN",
        "x".repeat(20).as_str(),
    )])
    .expect_err("typo")
    .to_string();
    assert!(
        err.contains("unknown configuration key `http.operator_tokn`"),
        "{err}"
    );
    assert!(err.contains("REFUND_WORKER__HTTP__OPERATOR_TOKN"), "{err}");
    assert!(err.contains("did you mean http.operator_token?"), "{err}");
    let err = load_env(&[("REFUND_WORKER__STORE__RETENTON", "30d")])
        .expect_err("typo")
        .to_string();
    assert!(err.contains("did you mean store.retention?"), "{err}");
    // An account's keys depend on its kind: `dedupe_requests` is
    // CreditGuard's.
    let err = load_env(&[("REFUND_WORKER__PROVIDERS__HYP_PAY__DEDUPE_REQUESTS", "true")])
        .expect_err("not a Hyp Pay key")
        .to_string();
    assert!(err.contains("providers.hyp_pay.dedupe_requests"), "{err}");
    let err = load_env(&[("REFUND_WORKER__PROVIDERS__HYP_PAY__BREAKER__COOLDOWM", "5s")])
        .expect_err("typo")
        .to_string();
    assert!(
        err.contains("did you mean providers.hyp_pay.breaker.cooldown?"),
        "{err}"
    );
    // In a file too; nothing close: no suggestion.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, "[amqp]\nzzz = 1\n").expect("write");
    let env = [
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "from-env"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let err = Settings::load_from(Some(&file), Some(env))
        .expect_err("unknown")
        .to_string();
    assert!(err.contains("`amqp.zzz`"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(!err.contains("did you mean"), "{err}");
    // Every key the defaults set is known.
    load_env(&[]).expect("the defaults are all known keys");
}

#[test]
fn the_retired_cluster_keys_stop_start_up_naming_store_backend() {
    let env = [
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "from-env"),
        ("REFUND_WORKER__CLUSTER__ENABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let err = Settings::load_from(None, Some(env))
        .expect_err("cluster keys")
        .to_string();
    assert!(err.contains("cluster.enabled"), "{err}");
    assert!(err.contains("store.backend"), "{err}");
}

#[test]
fn retention_takes_durations_and_the_older_day_key() {
    let s = with(HYP).expect("valid");
    assert_eq!(s.store.retention().records, DAY * 30);
    assert_eq!(s.store.retention().tombstones, DAY * 400);
    assert_eq!(s.store.prune_every(), Duration::from_secs(3600));
    let s = with(&format!("{HYP}\n[store]\nretention_days = 7\n")).expect("valid");
    assert_eq!(s.store.retention().records, DAY * 7);
    let env = [
        ("REFUND_WORKER__STORE__RETENTION", "3s"),
        ("REFUND_WORKER__STORE__PRUNE_INTERVAL", "1s"),
        ("REFUND_WORKER__STORE__TOMBSTONE_RETENTION", "12h"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "from-env"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = Settings::load_from(None, Some(env)).expect("valid");
    assert_eq!(s.store.retention().records, Duration::from_secs(3));
    assert_eq!(
        s.store.retention().tombstones,
        Duration::from_secs(12 * 3600)
    );
    assert_eq!(s.store.prune_every(), Duration::from_secs(1));
    let err = with(&format!("{HYP}\n[store]\nretention = \"soon\"\n"))
        .expect_err("bad duration")
        .to_string();
    assert!(err.contains("soon"), "{err}");
    let err = with(&format!("{HYP}\n[store]\nretention = \"500d\"\n"))
        .expect_err("outlives tombstones")
        .to_string();
    assert!(err.contains("store.tombstone_retention"), "{err}");
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1_209_600)));
    // Months and years are refused: "15M" is too easily meant as minutes.
    assert!(parse_duration("15M").is_err());
    assert!(parse_duration("1y").is_err());
    assert!(parse_duration("5x").is_err());
    assert!(parse_duration("-5s").is_err());
}

#[test]
fn every_non_string_key_can_be_set_from_the_environment() {
    let env: std::collections::HashMap<String, String> = [
        ("REFUND_WORKER__AMQP__PREFETCH", "7"),
        ("REFUND_WORKER__AMQP__MAX_BODY_BYTES", "1234"),
        ("REFUND_WORKER__AMQP__CONFIRM_TIMEOUT_MS", "4321"),
        ("REFUND_WORKER__STORE__RETENTION_DAYS", "9"),
        ("REFUND_WORKER__STORE__PRUNE_INTERVAL_SECS", "11"),
        ("REFUND_WORKER__STORE__TOMBSTONE_RETENTION", "20d"),
        ("REFUND_WORKER__STORE__OUTBOX_SWEEP_INTERVAL", "3s"),
        ("REFUND_WORKER__STORE__GROUP_COMMIT_LINGER_US", "250"),
        ("REFUND_WORKER__RUNTIME__WORKER_THREADS", "3"),
        ("REFUND_WORKER__HTTP__CALLBACK_MAX_BODY_BYTES", "2048"),
        ("REFUND_WORKER__HTTP__CALLBACK_TIMEOUT_MS", "1500"),
        ("REFUND_WORKER__RETRY__MAX_ATTEMPTS", "5"),
        ("REFUND_WORKER__RETRY__INITIAL_DELAY_MS", "10"),
        ("REFUND_WORKER__RETRY__MAX_DELAY_MS", "20"),
        ("REFUND_WORKER__RETRY__DEADLINE_MS", "30"),
        ("REFUND_WORKER__RETRY__DELAYED_MS", "100,200"),
        ("REFUND_WORKER__PROVIDER_HTTP__TIMEOUT_MS", "40"),
        ("REFUND_WORKER__PROVIDER_HTTP__CONNECT_TIMEOUT_MS", "50"),
        ("REFUND_WORKER__PROVIDERS__CG__KIND", "creditguard"),
        (
            "REFUND_WORKER__PROVIDERS__CG__BASE_URL",
            "https://cg.example/xpo/Relay",
        ),
        ("REFUND_WORKER__PROVIDERS__CG__USER", "u"),
        ("REFUND_WORKER__PROVIDERS__CG__PASSWORD", "p"),
        (
            "REFUND_WORKER__PROVIDERS__CG__TERMINAL_NUMBER",
            "0882819014",
        ),
        ("REFUND_WORKER__PROVIDERS__CG__DEDUPE_REQUESTS", "true"),
        ("REFUND_WORKER__PROVIDERS__PN__KIND", "paynet"),
        ("REFUND_WORKER__PROVIDERS__PN__SECRET_KEY", "k"),
        (
            "REFUND_WORKER__PROVIDERS__PN__PENDING_ALERT_AFTER_SECS",
            "600",
        ),
        ("REFUND_WORKER__PROVIDERS__PN__MAX_IN_FLIGHT", "4"),
        ("REFUND_WORKER__PROVIDERS__PN__RATE_PER_SEC", "12.5"),
        ("REFUND_WORKER__PROVIDERS__PN__BURST", "3"),
        ("REFUND_WORKER__PROVIDERS__PN__PROPAGATE_TRACE", "true"),
        ("REFUND_WORKER__PROVIDERS__PN__BREAKER__FAILURES", "2"),
        ("REFUND_WORKER__PROVIDERS__PN__BREAKER__WINDOW", "10s"),
        ("REFUND_WORKER__PROVIDERS__PN__BREAKER__COOLDOWN", "2m"),
        ("REFUND_WORKER__AMQP__ACCOUNT_SHARE", "0.25"),
        (
            "REFUND_WORKER__TELEMETRY__OTLP_ENDPOINT",
            "http://127.0.0.1:4318",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = Settings::load_from(None, Some(env)).expect("valid");
    assert_eq!(s.amqp.prefetch, 7);
    assert_eq!(s.amqp.max_body_bytes, 1234);
    assert_eq!(s.amqp.confirm_timeout_ms, 4321);
    assert_eq!(s.store.retention().records, DAY * 9);
    assert_eq!(s.store.prune_every(), Duration::from_secs(11));
    assert_eq!(s.store.retention().tombstones, DAY * 20);
    assert_eq!(s.store.outbox_sweep_every(), Duration::from_secs(3));
    assert_eq!(s.store.group_commit_linger_us, 250);
    assert_eq!(s.runtime.worker_threads, Some(3));
    assert_eq!(s.runtime_threads(), Some(3));
    assert_eq!(s.http.callback_max_body_bytes, 2048);
    assert_eq!(s.http.callback_timeout_ms, 1500);
    assert_eq!(s.retry.max_attempts, 5);
    assert_eq!(
        (
            s.retry.initial_delay_ms,
            s.retry.max_delay_ms,
            s.retry.deadline_ms
        ),
        (10, 20, 30)
    );
    assert_eq!(s.retry.delayed_ms, vec![100, 200]);
    assert_eq!(
        (
            s.provider_http.timeout_ms,
            s.provider_http.connect_timeout_ms
        ),
        (40, 50)
    );
    match &s.providers["cg"] {
        ProviderAccount::Creditguard(a) => {
            assert!(a.dedupe_requests);
            assert_eq!(a.terminal_number, "0882819014");
        }
        other => panic!("{other:?}"),
    }
    match &s.providers["pn"] {
        ProviderAccount::Paynet(a) => {
            assert_eq!(a.pending_alert_after_secs, 600);
            assert_eq!(a.policy.max_in_flight, Some(4));
            assert_eq!(a.policy.rate_per_sec, Some(12.5));
            assert_eq!(a.policy.burst, Some(3));
            assert!(a.policy.propagate_trace);
            assert_eq!(a.policy.breaker.failures, 2);
            assert_eq!(a.policy.breaker.window, Duration::from_secs(10));
            assert_eq!(a.policy.breaker.cooldown, Duration::from_secs(120));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.amqp.account_share, 0.25);
    assert_eq!(
        s.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318")
    );
}

#[test]
fn nonsense_limits_stop_start_up_naming_the_key() {
    let paynet = |var: &str, value: &str| -> std::collections::HashMap<String, String> {
        [
            (
                "REFUND_WORKER__PROVIDERS__PN__KIND".to_string(),
                "paynet".to_string(),
            ),
            (
                "REFUND_WORKER__PROVIDERS__PN__SECRET_KEY".to_string(),
                "k".to_string(),
            ),
            (
                format!("REFUND_WORKER__PROVIDERS__PN__{var}"),
                value.to_string(),
            ),
        ]
        .into_iter()
        .collect()
    };
    for (var, value, needle) in [
        ("RATE_PER_SEC", "0", "providers.pn.rate_per_sec"),
        ("MAX_IN_FLIGHT", "0", "providers.pn.max_in_flight"),
        ("BREAKER__WINDOW", "0s", "providers.pn.breaker.window"),
        ("BURST", "-1", "REFUND_WORKER__PROVIDERS__PN__BURST"),
    ] {
        let err = Settings::load_from(None, Some(paynet(var, value)))
            .expect_err("nonsense")
            .to_string();
        assert!(err.contains(needle), "{var}={value}: {err}");
    }
}

#[test]
fn errors_say_where_the_value_came_from() {
    let env = [
        ("REFUND_WORKER__AMQP__PREFETCH", "0"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918"),
        ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "from-env"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let err = Settings::load_from(None, Some(env))
        .expect_err("invalid")
        .to_string();
    assert!(err.contains("`amqp.prefetch`"), "{err}");
    assert!(
        err.contains("environment variable REFUND_WORKER__AMQP__PREFETCH"),
        "{err}"
    );
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, format!("{HYP}\n[amqp]\nprefetch = \"many\"\n")).expect("write");
    let err = Settings::load_from(Some(&file), Some(Default::default()))
        .expect_err("invalid")
        .to_string();
    assert!(
        err.contains("amqp.prefetch") && err.contains("worker.toml"),
        "{err}"
    );
}

#[test]
fn debug_output_hides_secrets() {
    let s = with(HYP).expect("valid");
    let dump = format!("{s:?}");
    assert!(!dump.contains("secret-pass"));
    assert!(!dump.contains("guest:guest"));
}

#[test]
fn the_runtime_has_one_thread_up_to_prefetch_32_unless_configured() {
    let env = |prefetch: &str, threads: Option<&str>| {
        [
            ("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", Some("hyp_pay")),
            (
                "REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF",
                Some("0010131918"),
            ),
            ("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", Some("p")),
            ("REFUND_WORKER__AMQP__PREFETCH", Some(prefetch)),
            ("REFUND_WORKER__RUNTIME__WORKER_THREADS", threads),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
        .collect()
    };
    let threads = |prefetch: &str, threads: Option<&str>| {
        Settings::load_from(None, Some(env(prefetch, threads)))
            .expect("valid")
            .runtime_threads()
    };
    // Unset: one thread up to prefetch 32, one per core above.
    assert_eq!(threads("32", None), Some(1));
    assert_eq!(threads("16", None), Some(1));
    assert_eq!(threads("33", None), None);
    assert_eq!(threads("64", None), None);
    assert_eq!(threads("256", None), None);
    // Set: as given, whatever the prefetch; 0 is one per core.
    assert_eq!(threads("256", Some("1")), Some(1));
    assert_eq!(threads("16", Some("4")), Some(4));
    assert_eq!(threads("16", Some("0")), None);
    let err = Settings::load_from(None, Some(env("64", Some("20000"))))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("runtime.worker_threads"), "{err}");
    assert!(err.contains("20000"), "{err}");
    let err = Settings::load_from(None, Some(env("64", Some("two"))))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("worker_threads"), "{err}");
}
