//! The Kafka participant over the real broker's SASL_SSL listener (TLS, then SCRAM) and SSL
//! listener (mutual TLS), as `integration-tests/scripts/kafka.sh` runs them: a two-participant
//! transaction commits and is read back read_committed over SASL_SSL; an adapter killed after
//! prepare finishes its branch after a restart with its own EndTxn client over TLS + SCRAM; a
//! wrong password, a CA that did not sign the broker, a missing client certificate and
//! options that do not go together stop the adapter at start, saying why; SSL with a client
//! certificate and SCRAM-SHA-256 with the password from the environment work too.

use std::time::Duration;

use pledge_integration_tests::kafka::*;
use pledge_integration_tests::*;
use pledge_kafka::security::{BrokerSecurity, Password, SaslCredentials, SaslMechanism, SecurityProtocol};
use pledge_kafka::wire::TxnClient;
use pledge_proto::v1;

struct Setup {
    dir: TestDir,
    secure: SecureKafka,
    kafka: Process,
    reference: Process,
    coordinator: Process,
    prefix: String,
    args: Vec<String>,
}

/// Logs of the wire client's connections and coordinator requests, which the tests read.
const WIRE_DEBUG: (&str, &str) = ("RUST_LOG", "info,pledge_kafka::wire=debug");

/// A reference participant, a Kafka adapter over SASL_SSL with SCRAM-SHA-512 (the password from
/// its file), and a coordinator of both.
async fn setup(test: &str, kafka_env: &[(&str, &str)]) -> Setup {
    let dir = TestDir::new(test);
    let secure = SecureKafka::from_env();
    let prefix = unique(test);
    let mut args = secure.sasl_ssl_args("SCRAM-SHA-512");
    args.extend(["--kafka-sasl-password-file".into(), secure.password_file.display().to_string()]);
    let kafka = dir.kafka_adapter_at("kafka", 0, &prefix, &secure.sasl_ssl_bootstrap, &args, kafka_env).await;
    let reference = dir.participant("ref", 0, &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka), ("ref", &reference)], &[]).await;
    Setup { dir, secure, kafka, reference, coordinator, prefix, args }
}

impl Setup {
    async fn restart_kafka(&mut self, env: &[(&str, &str)]) {
        let port = self.kafka.port();
        let bootstrap = self.secure.sasl_ssl_bootstrap.clone();
        self.kafka = self.dir.kafka_adapter_at("kafka", port, &self.prefix, &bootstrap, &self.args, env).await;
    }

    /// A transaction with a Kafka branch (records `keys` to `topic`) and a reference branch.
    async fn begin_with_records(&self, topic: &str, keys: &[&str]) -> String {
        let mut c = coordinator_client(&self.coordinator).await;
        let gtid = begin(&mut c, &[("kafka", "out"), ("ref", "r")]).await;
        let records: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "v")).collect();
        let positions = produce(&mut kafka_client(&self.kafka).await, &gtid, "out", topic, &records).await.unwrap();
        assert_eq!(positions.positions.len(), keys.len());
        put(&mut store_client(&self.reference).await, &gtid, "r", &format!("{gtid}-ref"), "x").await;
        gtid
    }

    /// The adapter's own wire client, over SASL_SSL with the same credentials.
    fn wire_client(&self) -> TxnClient {
        let security = BrokerSecurity {
            protocol: SecurityProtocol::SaslSsl,
            ca: Some(self.secure.ca.clone()),
            cert: None,
            key: None,
            sasl: Some(SaslCredentials {
                mechanism: SaslMechanism::ScramSha512,
                username: self.secure.username.clone(),
                password: Password::new(self.secure.password()).unwrap(),
            }),
        };
        TxnClient::with_security(&self.secure.sasl_ssl_bootstrap, Duration::from_secs(5), &security).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_commits_over_sasl_ssl_and_is_read_back_over_sasl_ssl() {
    let s = setup("kafka-sasl-ssl", &[]).await;
    assert!(
        s.kafka.log().contains("reached the Kafka brokers")
            && s.kafka.log().contains("SASL_SSL, SCRAM-SHA-512 as pledge"),
        "{}",
        s.kafka.log_tail()
    );
    let topic = unique("sasl-ssl");
    let mut c = coordinator_client(&s.coordinator).await;
    let committed = s.begin_with_records(&topic, &["c1", "c2"]).await;
    let aborted = s.begin_with_records(&topic, &["a1"]).await;
    c.abort(v1::AbortRequest { gtid: aborted }).await.unwrap();
    let r = commit(&mut c, &committed, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
    let branch =
        get(&mut c, &committed).await.unwrap().branches.into_iter().find(|b| b.resource_id == "kafka").unwrap();
    let metadata = String::from_utf8(branch.metadata).unwrap();
    assert!(metadata.starts_with(&format!("transactional.id={}-", s.prefix)), "vote metadata: {metadata}");
    // Read back by a read_committed consumer that also logs in with SCRAM over TLS: exactly the
    // committed records.
    assert_eq!(committed_keys_with(&s.secure.sasl_ssl(), &topic, &["c1", "c2"]).await, vec!["c1", "c2"]);
}

/// The adapter dies (kill -9 at its crash point) as the commit of its prepared branch reaches
/// it. Restarted, it no longer has the producer: recovery's commit goes through its wire client
/// — FindCoordinator and EndTxn to the transaction coordinator of the SASL_SSL listener, on a
/// connection that passed TLS and SCRAM — and the records become visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_killed_after_prepare_commits_with_end_txn_over_tls_and_scram() {
    let mut s = setup("kafka-sasl-crash", &[("PLEDGE_CRASH_AT", "journaled::before_commit")]).await;
    let topic = unique("sasl-crash");
    let gtid = s.begin_with_records(&topic, &["k1", "k2"]).await;
    let mut c = coordinator_client(&s.coordinator).await;
    assert_eq!(commit(&mut c, &gtid, false).await.unwrap().outcome(), v1::Outcome::Committed);
    s.kafka.wait_crashed().await;

    let metadata =
        get(&mut c, &gtid).await.unwrap().branches.into_iter().find(|b| b.resource_id == "kafka").unwrap().metadata;
    let txn = pledge_kafka::txn::TxnRef::from_metadata(&metadata).expect("vote metadata");
    let wire = s.wire_client();
    let open = wire.describe(&txn.transactional_id).await.unwrap().expect("the transaction is known");
    assert_eq!((open.state.as_str(), open.producer_id), ("Ongoing", txn.producer_id), "{open:?}");

    s.restart_kafka(&[WIRE_DEBUG]).await;
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed, r.heuristic), (v1::Outcome::Committed, true, false), "{}", r.reason);
    let log = s.kafka.log();
    assert!(log.contains("prepared branch finished with EndTxn"), "{}", s.kafka.log_tail());
    let sasl_ssl = &s.secure.sasl_ssl_bootstrap;
    let end_txn_sent = log
        .lines()
        .any(|l| l.contains("to the transaction coordinator") && l.contains("EndTxn") && l.contains(sasl_ssl.as_str()));
    assert!(end_txn_sent, "EndTxn went to the coordinator on the SASL_SSL listener {sasl_ssl}:\n{log}");
    let authenticated =
        log.lines().any(|l| l.contains("connected to a broker") && l.contains("SCRAM-SHA-512") && l.contains(sasl_ssl));
    assert!(authenticated, "the wire client's connection passed TLS and SCRAM:\n{log}");
    assert!(!log.contains(&kafka_bootstrap()), "nothing went to the PLAINTEXT listener:\n{log}");

    // Nothing has used the transactional id since (its producer starts with the next branch
    // that gets it): the broker still describes the branch's own transaction, committed.
    let ended = wire.describe(&txn.transactional_id).await.unwrap();
    assert_eq!(txn.fate(ended.as_ref()), pledge_kafka::txn::Fate::Committed, "{ended:?}");
    assert_eq!(committed_keys_with(&s.secure.sasl_ssl(), &topic, &["k1", "k2"]).await, vec!["k1", "k2"]);

    // The transactional id's producer works again afterwards, over SASL_SSL too.
    let next = s.begin_with_records(&topic, &["k3"]).await;
    assert_eq!(commit(&mut c, &next, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys_with(&s.secure.sasl_ssl(), &topic, &["k1", "k2", "k3"]).await, vec!["k1", "k2", "k3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_an_unknown_ca_and_bad_options_are_refused_at_start() {
    let dir = TestDir::new("kafka-sasl-refused");
    let secure = SecureKafka::from_env();
    let sasl_ssl = secure.sasl_ssl_bootstrap.as_str();
    let with_password_file = |args: Vec<String>, file: &std::path::Path| {
        let mut args = args;
        args.extend(["--kafka-sasl-password-file".into(), file.display().to_string()]);
        args
    };

    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let args = with_password_file(secure.sasl_ssl_args("SCRAM-SHA-512"), &wrong);
    let e = dir.kafka_adapter_refused("wrong-password", sasl_ssl, &args, &[]).await;
    assert!(e.contains("refused the SASL SCRAM-SHA-512 login as \"pledge\""), "{e}");
    assert!(e.contains("invalid credentials"), "the broker's reason is shown: {e}");
    assert!(!e.contains("not-the-password"), "the password is never printed: {e}");

    let other = pledge_integration_tests::tls::Pki::new(dir.path(), "other");
    let mut args = with_password_file(secure.sasl_ssl_args("SCRAM-SHA-512"), &secure.password_file);
    let ca = args.iter().position(|a| a == "--kafka-ca").unwrap() + 1;
    args[ca] = other.ca.display().to_string();
    let e = dir.kafka_adapter_refused("unknown-ca", sasl_ssl, &args, &[]).await;
    assert!(e.contains("invalid peer certificate") && e.contains("UnknownIssuer"), "{e}");
    assert!(e.contains("is the CA file the one that signed the broker's certificate"), "{e}");

    // The SSL listener wants a client certificate: none given, the broker's refusal is named.
    let mut args = secure.ssl_args();
    args.truncate(4); // --kafka-security-protocol SSL --kafka-ca <ca>
    let e = dir.kafka_adapter_refused("no-client-cert", &secure.ssl_bootstrap, &args, &[]).await;
    assert!(e.contains("TLS with") && e.contains("client certificate"), "{e}");

    // TLS options without TLS, and SASL without a mechanism: refused before any connection.
    let e = dir
        .kafka_adapter_refused(
            "ca-without-tls",
            &kafka_bootstrap(),
            &["--kafka-ca".into(), secure.ca.display().to_string()],
            &[],
        )
        .await;
    assert!(e.contains("--kafka-ca given, but --kafka-security-protocol is PLAINTEXT"), "{e}");
    let mut args = with_password_file(secure.sasl_ssl_args("SCRAM-SHA-512"), &secure.password_file);
    args.drain(4..6); // --kafka-sasl-mechanism SCRAM-SHA-512
    let e = dir.kafka_adapter_refused("no-mechanism", sasl_ssl, &args, &[]).await;
    assert!(e.contains("--kafka-security-protocol SASL_SSL needs --kafka-sasl-mechanism"), "{e}");
    let args = secure.sasl_ssl_args("SCRAM-SHA-512");
    let e = dir.kafka_adapter_refused("no-password", sasl_ssl, &args, &[]).await;
    assert!(e.contains("needs the SASL password") && e.contains("PLEDGE_KAFKA_SASL_PASSWORD"), "{e}");
    let password = secure.password();
    let args = with_password_file(secure.sasl_ssl_args("SCRAM-SHA-512"), &secure.password_file);
    let e =
        dir.kafka_adapter_refused("two-passwords", sasl_ssl, &args, &[("PLEDGE_KAFKA_SASL_PASSWORD", &password)]).await;
    assert!(e.contains("the SASL password is given twice"), "{e}");
}

/// SSL without SASL: the adapter presents its client certificate (the listener requires one) to
/// librdkafka's producers and its own wire client alike; a one-phase commit is read back over
/// SSL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_with_a_client_certificate_commits() {
    let dir = TestDir::new("kafka-ssl");
    let secure = SecureKafka::from_env();
    let prefix = unique("kafka-ssl");
    let kafka =
        dir.kafka_adapter_at("kafka", 0, &prefix, &secure.ssl_bootstrap, &secure.ssl_args(), &[WIRE_DEBUG]).await;
    assert!(kafka.log().contains("SSL with a client certificate"), "{}", kafka.log_tail());
    let coordinator = dir.coordinator(&[("kafka", &kafka)], &[]).await;
    let topic = unique("ssl");
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("kafka", "solo")]).await;
    produce(&mut kafka_client(&kafka).await, &gtid, "solo", &topic, &[("s1", "v")]).await.unwrap();
    let r = commit(&mut c, &gtid, true).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Committed, "{}", r.reason);
    // The prepare-time check (DescribeTransactions) went through the wire client over SSL.
    let log = kafka.log();
    let described = log.lines().any(|l| {
        l.contains("to the transaction coordinator")
            && l.contains("DescribeTransactions")
            && l.contains(&secure.ssl_bootstrap)
    });
    assert!(described, "{log}");
    assert_eq!(committed_keys_with(&secure.ssl(), &topic, &["s1"]).await, vec!["s1"]);
}

/// SCRAM-SHA-256, the password taken from PLEDGE_KAFKA_SASL_PASSWORD (not a file, not a flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_with_the_password_from_the_environment_commits() {
    let dir = TestDir::new("kafka-scram-256");
    let secure = SecureKafka::from_env();
    let prefix = unique("kafka-scram-256");
    let password = secure.password();
    let env = [("PLEDGE_KAFKA_SASL_PASSWORD", password.as_str())];
    let args = secure.sasl_ssl_args("SCRAM-SHA-256");
    let kafka = dir.kafka_adapter_at("kafka", 0, &prefix, &secure.sasl_ssl_bootstrap, &args, &env).await;
    assert!(kafka.log().contains("SASL_SSL, SCRAM-SHA-256 as pledge"), "{}", kafka.log_tail());
    let coordinator = dir.coordinator(&[("kafka", &kafka)], &[]).await;
    let topic = unique("scram-256");
    let mut c = coordinator_client(&coordinator).await;
    let gtid = begin(&mut c, &[("kafka", "solo")]).await;
    produce(&mut kafka_client(&kafka).await, &gtid, "solo", &topic, &[("s1", "v")]).await.unwrap();
    assert_eq!(commit(&mut c, &gtid, true).await.unwrap().outcome(), v1::Outcome::Committed);
    assert_eq!(committed_keys_with(&secure.sasl_ssl(), &topic, &["s1"]).await, vec!["s1"]);
}
