//! Helpers for tests against the real Kafka broker the project's scripts start: the adapter's
//! work API and read_committed reads, over the broker's PLAINTEXT listener or its SSL and
//! SASL_SSL ones ([`SecureKafka`]).

use std::path::PathBuf;
use std::time::Duration;

use pledge_proto::v1::{self, kafka_branch_client::KafkaBranchClient};
use tokio::process::Command;
use tonic::transport::Channel;

use crate::{EVENTUALLY_TIMEOUT, EXIT_TIMEOUT, Process, TestDir, bin, kafka_bootstrap};

pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", fastrand::u32(..))
}

pub async fn kafka_client(p: &Process) -> KafkaBranchClient<Channel> {
    KafkaBranchClient::connect(p.endpoint()).await.unwrap()
}

pub async fn produce(
    k: &mut KafkaBranchClient<Channel>,
    gtid: &str,
    branch_id: &str,
    topic: &str,
    records: &[(&str, &str)],
) -> Result<v1::ProduceResponse, tonic::Status> {
    k.produce(v1::ProduceRequest {
        resource_id: "kafka".into(),
        gtid: gtid.into(),
        branch_id: branch_id.into(),
        records: records
            .iter()
            .map(|(key, value)| v1::KafkaRecord {
                topic: topic.into(),
                partition: Some(0),
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                headers: vec![],
            })
            .collect(),
        request_id: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The keys a read_committed reader sees in `topic` once they are `want`, or what it sees when
/// the tests' patience runs out (for the assertion to show). A commit is answered before the
/// broker has written the transaction's markers, and a reader sees the records only after.
pub async fn committed_keys(topic: &str, want: &[&str]) -> Vec<String> {
    committed_keys_with(&Listener::plaintext(), topic, want).await
}

/// [`committed_keys`] through `listener`.
pub async fn committed_keys_with(listener: &Listener, topic: &str, want: &[&str]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + EVENTUALLY_TIMEOUT;
    loop {
        let seen: Vec<String> = read_committed_with(listener, topic).await.into_iter().map(|(k, _)| k).collect();
        if seen == want || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One of the broker's listeners, as a librdkafka client reaches it.
#[derive(Debug, Clone)]
pub struct Listener {
    pub bootstrap: String,
    /// `security.protocol`, `ssl.*`, `sasl.*`.
    pub settings: Vec<(&'static str, String)>,
}

impl Listener {
    pub fn plaintext() -> Listener {
        Listener { bootstrap: kafka_bootstrap(), settings: vec![] }
    }
}

/// Everything a read_committed consumer reaching the broker through `listener` sees in
/// partition 0 of `topic`, from the beginning up to the last stable offset, as (key, value).
/// Waits (bounded) for the partition to exist. (`crate::read_committed` is this over the
/// PLAINTEXT listener.)
pub async fn read_committed_with(listener: &Listener, topic: &str) -> Vec<(String, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let (topic, listener) = (topic.to_string(), listener.clone());
    tokio::task::spawn_blocking(move || {
        let mut config = ClientConfig::new();
        for (k, v) in &listener.settings {
            config.set(*k, v);
        }
        let consumer: BaseConsumer = config
            .set("bootstrap.servers", &listener.bootstrap)
            .set("group.id", format!("pledge-test-reader-{}", fastrand::u64(..)))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let deadline = std::time::Instant::now() + EVENTUALLY_TIMEOUT;
        // The end: a read_committed consumer's high watermark is the last stable offset (below
        // the first record of a transaction still open).
        let high = loop {
            match consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5)) {
                Ok((_, high)) => break high,
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("watermarks of {topic} through {}: {e}", listener.bootstrap),
            }
        };
        if high == 0 {
            return Vec::new();
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        loop {
            let position = consumer.position().unwrap().find_partition(&topic, 0).and_then(|p| p.offset().to_raw());
            if position.is_some_and(|p| p >= high) {
                return out;
            }
            assert!(std::time::Instant::now() < deadline, "reading {topic}: stuck at {position:?} of {high}");
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let m = message.expect("consuming");
                let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).to_string();
                out.push((text(m.key()), text(m.payload())));
            }
        }
    })
    .await
    .expect("reader thread")
}

/// The broker's SSL listener (client certificates required) and SASL_SSL listener (SCRAM), with
/// the test CA, a client certificate and the SCRAM user: `kafka.sh env`.
#[derive(Debug, Clone)]
pub struct SecureKafka {
    pub ssl_bootstrap: String,
    pub sasl_ssl_bootstrap: String,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub username: String,
    pub password_file: PathBuf,
}

impl SecureKafka {
    pub fn from_env() -> SecureKafka {
        crate::containers::require_local("Kafka's SSL and SASL_SSL listeners");
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: these tests need the SSL and SASL_SSL listeners of the Kafka broker the \
                     project's scripts start (bash integration-tests/run.sh does it; by hand: bash \
                     integration-tests/scripts/kafka.sh start && eval \"$(bash integration-tests/scripts/kafka.sh env)\")"
                )
            })
        };
        SecureKafka {
            ssl_bootstrap: var("PLEDGE_KAFKA_SSL_BOOTSTRAP"),
            sasl_ssl_bootstrap: var("PLEDGE_KAFKA_SASL_SSL_BOOTSTRAP"),
            ca: var("PLEDGE_KAFKA_TLS_CA").into(),
            client_cert: var("PLEDGE_KAFKA_TLS_CLIENT_CERT").into(),
            client_key: var("PLEDGE_KAFKA_TLS_CLIENT_KEY").into(),
            username: var("PLEDGE_KAFKA_SCRAM_USERNAME"),
            password_file: var("PLEDGE_KAFKA_SCRAM_PASSWORD_FILE").into(),
        }
    }

    /// The SCRAM user's password.
    pub fn password(&self) -> String {
        std::fs::read_to_string(&self.password_file).expect("the SCRAM password file").trim_end().to_string()
    }

    /// The adapter's flags for the SASL_SSL listener with `mechanism` (SCRAM-SHA-512 or
    /// SCRAM-SHA-256), without the password (give `--kafka-sasl-password-file` or the
    /// environment variable).
    pub fn sasl_ssl_args(&self, mechanism: &str) -> Vec<String> {
        vec![
            "--kafka-security-protocol".into(),
            "SASL_SSL".into(),
            "--kafka-ca".into(),
            self.ca.display().to_string(),
            "--kafka-sasl-mechanism".into(),
            mechanism.into(),
            "--kafka-sasl-username".into(),
            self.username.clone(),
        ]
    }

    /// The adapter's flags for the SSL listener, with the client certificate.
    pub fn ssl_args(&self) -> Vec<String> {
        vec![
            "--kafka-security-protocol".into(),
            "SSL".into(),
            "--kafka-ca".into(),
            self.ca.display().to_string(),
            "--kafka-cert".into(),
            self.client_cert.display().to_string(),
            "--kafka-key".into(),
            self.client_key.display().to_string(),
        ]
    }

    /// A librdkafka client of the SASL_SSL listener (SCRAM-SHA-512).
    pub fn sasl_ssl(&self) -> Listener {
        Listener {
            bootstrap: self.sasl_ssl_bootstrap.clone(),
            settings: vec![
                ("security.protocol", "sasl_ssl".into()),
                ("ssl.ca.location", self.ca.display().to_string()),
                ("sasl.mechanism", "SCRAM-SHA-512".into()),
                ("sasl.username", self.username.clone()),
                ("sasl.password", self.password()),
            ],
        }
    }

    /// A librdkafka client of the SSL listener, with the client certificate.
    pub fn ssl(&self) -> Listener {
        Listener {
            bootstrap: self.ssl_bootstrap.clone(),
            settings: vec![
                ("security.protocol", "ssl".into()),
                ("ssl.ca.location", self.ca.display().to_string()),
                ("ssl.certificate.location", self.client_cert.display().to_string()),
                ("ssl.key.location", self.client_key.display().to_string()),
            ],
        }
    }
}

impl TestDir {
    /// [`TestDir::kafka_adapter`] reaching the brokers at `bootstrap` (one of the broker's
    /// listeners; `args` say how: [`SecureKafka::sasl_ssl_args`], ...).
    pub async fn kafka_adapter_at(
        &self,
        name: &str,
        port: u16,
        prefix: &str,
        bootstrap: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Process {
        let c = self.kafka_adapter_command(name, port, prefix, bootstrap, args, env);
        let log = self.path().join(format!("{name}.log"));
        Process::spawn(name, c, log).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts an adapter expected to refuse to start (its options, or the brokers' answer):
    /// what it printed on stderr. Fails the test if it serves, or does not exit in time.
    pub async fn kafka_adapter_refused(
        &self,
        name: &str,
        bootstrap: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> String {
        let mut c = self.kafka_adapter_command(name, 0, name, bootstrap, args, env);
        c.env("RUST_BACKTRACE", "0").kill_on_drop(true);
        let out = tokio::time::timeout(EXIT_TIMEOUT, c.output())
            .await
            .unwrap_or_else(|_| panic!("{name}: the adapter neither served nor exited within {EXIT_TIMEOUT:?}"))
            .expect("running pledge-kafka-adapter");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).to_string());
        assert!(!out.status.success() && !stdout.contains("listening on"), "{name}: the adapter started: {stderr}");
        stderr
    }

    fn kafka_adapter_command(
        &self,
        name: &str,
        port: u16,
        prefix: &str,
        bootstrap: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Command {
        let mut c = Command::new(bin("pledge-kafka-adapter"));
        c.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--resource-id")
            .arg("kafka")
            .arg("--bootstrap")
            .arg(bootstrap)
            .arg("--data-dir")
            .arg(self.path().join(name))
            .arg("--transactional-id-prefix")
            .arg(prefix)
            .args(args)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }
}
