//! Security on real replica processes with mutual TLS (certificates from `titus certs`' library):
//! t10 every RPC of every service refuses a caller without credentials, and the wrong kind of
//! certificate; t20 roles, ownership and the audit log across a leader change; t30 certificates
//! replaced on disk while clients are connected; t40 rate and size limits; t50 enrollment; t60 an
//! agent's unary status report is filtered like its stream; t70 idempotency tokens and environment
//! values belong to the job's owner; t80 thousands of idle connections from one address do not keep
//! an admin out.

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{scrape, value, wait_until, Cluster, Secure};
use prost::Message;
use raw::{call_as, call_raw};
use titus_client::proto as pb;
use titus_client::{Client, ClientOptions};
use titus_security::{certs, Connector, Identity, Kind, Tls, TlsFiles};
use tonic::Code;

const ELECTION: Duration = Duration::from_secs(30);

/// Certificates for replicas 1..=3, the given agents and clients, and a security file with
/// `extra` appended; the token `ops-token` is an operator.
fn setup(dir: &Path, agents: &[&str], extra: &str) -> Secure {
    let security = format!(
        r#"reload-interval-ms = 200
[[principals]]
name = "admin"
role = "admin"
[[principals]]
name = "alice"
role = "user"
owners = ["alice@example.com"]
[[principals]]
name = "bob"
role = "user"
owners = ["bob@example.com"]
applications = ["bobs-app"]
[[tokens]]
name = "ops"
sha256 = "{}"
role = "operator"
{extra}
"#,
        titus_security::token::sha256_hex("ops-token")
    );
    Secure::write(dir, agents, &["admin", "alice", "bob", "ops"], &security)
}

fn apis(c: &Cluster) -> Vec<String> {
    c.replicas.iter().map(|r| r.api_addr.clone()).collect()
}

/// An SDK client presenting `client-<name>`'s certificate.
fn client_as(c: &Cluster, name: &str) -> Client {
    let name = name.strip_prefix("client-").expect("a client certificate's stem");
    c.secure.as_ref().unwrap().client(apis(c), name)
}

/// An SDK client that trusts the cluster's CA and presents a bearer token, no certificate.
fn token_as(c: &Cluster, token: &str) -> Client {
    let dir = &c.secure.as_ref().unwrap().certs;
    Client::with_options(
        apis(c),
        ClientOptions::default().with_tls(dir.join("ca.pem"), None).unwrap().with_token(token),
    )
    .unwrap()
}

fn tls_of(c: &Cluster, stem: Option<&str>) -> Arc<Tls> {
    let dir = &c.secure.as_ref().unwrap().certs;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert_and_key: stem.map(|s| (dir.join(format!("{s}.pem")), dir.join(format!("{s}.key")))),
    };
    Tls::client(files, None).unwrap()
}

async fn channel(addr: &str, tls: Option<Arc<Tls>>) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(Connector::new(tls, Duration::from_secs(5)))
        .await
        .unwrap()
}

/// A call over TLS without a client certificate (and with `authorization`, when given); the
/// status it ended with, whether the handshake or the call refused it.
async fn call_without_certificate(
    addr: &str,
    tls: &Arc<Tls>,
    path: &str,
    authorization: Option<&str>,
) -> tonic::Status {
    let connected = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(Connector::new(Some(tls.clone()), Duration::from_secs(5)))
        .await;
    match connected {
        Ok(ch) => call_as(ch, path, Vec::new(), authorization).await,
        Err(e) => tonic::Status::unavailable(format!("no connection: {e}")),
    }
}

/// Every method of every service served on the api and peer ports, from their descriptors.
fn every_method() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for set in [
        titus_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    out.push((file.package().to_string(), format!("{}/{}", service.name(), method.name())));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_every_rpc_refuses_a_caller_without_credentials_and_the_wrong_certificate() {
    let agent = format!("sec-agent-{}", std::process::id());
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[&agent], "")));
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let r = c.replica(1);
    let anonymous = tls_of(&c, None);
    let methods = every_method();
    let services: std::collections::BTreeSet<_> =
        methods.iter().map(|(p, m)| format!("{p}.{}", m.split('/').next().unwrap())).collect();
    println!("{} methods of {} services: {services:?}", methods.len(), services.len());
    assert!(services.contains("titus.peer.RaftPeer") && services.contains("grpc.health.v1.Health"));
    assert!(services.contains("grpc.reflection.v1.ServerReflection") && services.contains("titus.AgentService"));
    for (package, method) in &methods {
        let path = format!("/{package}.{method}");
        if package == "titus.peer" {
            // The peer port requires a certificate in the handshake: without one (token or not)
            // there is no connection to call on.
            for token in [None, Some("Bearer ops-token")] {
                let status = call_without_certificate(&r.peer_addr, &anonymous, &path, token).await;
                assert!(status.code() != Code::Ok && status.code() != Code::PermissionDenied, "{path}: {status:?}");
            }
            continue;
        }
        let addr = &r.api_addr;
        // TLS without a client certificate or token.
        let status = call_raw(channel(addr, Some(anonymous.clone())).await, &path, Vec::new()).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}: {status:?}");
        assert!(status.message().contains("no client certificate and no bearer token"), "{path}: {status:?}");
        // A token nobody configured.
        let ch = channel(addr, Some(anonymous.clone())).await;
        let status = call_as(ch, &path, Vec::new(), Some("Bearer not-a-token")).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}: {status:?}");
        assert!(status.message().contains("bearer token is not recognised"), "{path}: {status:?}");
    }
    // Plaintext to a TLS port gets nowhere.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", r.api_addr)).unwrap().connect().await;
    if let Ok(ch) = plain {
        let status = call_raw(ch, "/titus.ClusterService/GetClusterStatus", Vec::new()).await;
        assert_ne!(status.code(), Code::Ok, "{status:?}");
    }
    // A certificate from another CA is refused in the handshake.
    let other_dir = c.dir().join("other");
    let other_ca = certs::new_ca("other CA", 1).unwrap();
    let mallory = certs::issue(&other_ca, &Identity::new(Kind::Client, "admin").unwrap(), "test", &[], 1).unwrap();
    certs::write_pair(&other_dir, "client-admin", &mallory).unwrap();
    let files = TlsFiles {
        ca: c.secure.as_ref().unwrap().certs.join("ca.pem"),
        cert_and_key: Some((other_dir.join("client-admin.pem"), other_dir.join("client-admin.key"))),
    };
    let forged = Tls::client(files, None).unwrap();
    let connected = tonic::transport::Endpoint::from_shared(format!("http://{}", r.api_addr))
        .unwrap()
        .connect_with_connector(Connector::new(Some(forged), Duration::from_secs(5)))
        .await;
    if let Ok(ch) = connected {
        let status = call_raw(ch, "/titus.ClusterService/GetClusterStatus", Vec::new()).await;
        assert_ne!(status.code(), Code::Ok, "a foreign CA's certificate was accepted: {status:?}");
    }

    // An agent certificate on a replica-only RPC, and on a client RPC; a client on an agent RPC.
    let agent_tls = tls_of(&c, Some(&format!("agent-{agent}")));
    let append = pb::peer::PeerMessage::default().encode_to_vec();
    let status =
        call_raw(channel(&r.peer_addr, Some(agent_tls.clone())).await, "/titus.peer.RaftPeer/AppendEntries", append)
            .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("rule replica-only"), "{status:?}");
    // An admin's client certificate is no replica either.
    let admin_tls = tls_of(&c, Some("client-admin"));
    let status = call_raw(channel(&r.peer_addr, Some(admin_tls)).await, "/titus.peer.RaftPeer/Vote", Vec::new()).await;
    assert!(status.code() == Code::PermissionDenied && status.message().contains("rule replica-only"), "{status:?}");
    // An agent reports only tasks placed on it.
    let report = pb::TaskStatusReport { task_id: "not-on-this-agent".into(), ..Default::default() };
    let status = call_raw(
        channel(&r.api_addr, Some(agent_tls.clone())).await,
        "/titus.AgentTaskService/ReportTaskStatus",
        report.encode_to_vec(),
    )
    .await;
    assert!(status.code() == Code::PermissionDenied && status.message().contains("rule agent-own-tasks"), "{status:?}");
    let status = call_raw(
        channel(&r.api_addr, Some(agent_tls.clone())).await,
        "/titus.JobManagementService/FindJobs",
        Vec::new(),
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("rule client-read"), "{status:?}");
    let alice = tls_of(&c, Some("client-alice"));
    let status = call_raw(channel(&r.api_addr, Some(alice)).await, "/titus.AgentService/Attach", Vec::new()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("rule agent-only"), "{status:?}");
    // An agent certificate registers only as its own agent.
    let register = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Register(pb::AgentRegister {
            agent_id: "someone-else".into(),
            ..Default::default()
        })),
    };
    let status =
        call_raw(channel(&r.api_addr, Some(agent_tls)).await, "/titus.AgentService/Attach", register.encode_to_vec())
            .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("rule agent-identity"), "{status:?}");
}

fn job(owner: &str, app: &str) -> pb::JobDescriptor {
    pb::JobDescriptor {
        owner: Some(pb::Owner { team_email: owner.into() }),
        application_name: app.into(),
        container: Some(pb::Container {
            resources: Some(pb::ContainerResources { cpu: 1.0, memory_mb: 128, ..Default::default() }),
            image: Some(pb::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "1".into()],
            ..Default::default()
        }),
        job_type: Some(pb::job_descriptor::JobType::Service(pb::ServiceJobSpec {
            capacity: Some(pb::Capacity { min: 0, desired: 1, max: 2 }),
            enabled: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The status a call failed with (PermissionDenied arrives as a server error).
fn denied(e: titus_client::Error) -> tonic::Status {
    match e {
        titus_client::Error::Server { status, .. } => status,
        other => panic!("expected a refusal, got {other}"),
    }
}

async fn audit(client: &Client, caller: &str, method: &str) -> Vec<pb::AuditRecord> {
    let query = pb::AuditQuery { caller: caller.into(), method: method.into(), limit: 1000, ..Default::default() };
    client.audit_records(query).await.map(|r| r.records).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_users_change_only_their_jobs_roles_gate_the_rest_and_the_audit_log_survives_a_leader_change() {
    let c = Cluster::start_with(3, &[], |dir| Some(setup(dir, &[], "")));
    let (admin, alice, bob) =
        (client_as(&c, "client-admin"), client_as(&c, "client-alice"), client_as(&c, "client-bob"));
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;

    let alices = alice.create_job(job("alice@example.com", "web")).await.unwrap();
    let bobs = bob.create_job(job("bob@example.com", "bobs-app")).await.unwrap();
    // Bob holds bobs-app whoever owns it; he cannot submit a job as Alice.
    bob.create_job(job("carol@example.com", "bobs-app")).await.unwrap();
    let s = denied(bob.create_job(job("alice@example.com", "web")).await.unwrap_err());
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("rule job-owner") && s.message().contains("client/bob"), "{s:?}");

    // Bob can neither kill nor resize Alice's job; it is untouched.
    let s = denied(bob.kill_job(&alices).await.unwrap_err());
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains(&format!("of job {alices}")), "{s:?}");
    let s = denied(bob.update_job_capacity(&alices, None, Some(2), None).await.unwrap_err());
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // Refusals are logged with who, what and the rule.
    let logged = c.replicas.iter().any(|r| {
        std::fs::read_to_string(&r.log).unwrap_or_default().lines().any(|l| {
            l.contains("permission denied")
                && l.contains("client/bob")
                && l.contains("job-owner")
                && l.contains(&alices)
        })
    });
    assert!(logged, "no replica logged bob's refused kill");
    let s = denied(bob.update_job_attributes(&alices, &[("k", "v")]).await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule job-owner"), "{s:?}");
    let task = wait_until(Duration::from_secs(20), "a task of alice's job", || async {
        admin.find_tasks(&[("jobIds", alices.as_str())], 10, "").await.ok()?.items.into_iter().next()
    })
    .await;
    let s = denied(bob.kill_task(&task.id, false, false).await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule job-owner"), "{s:?}");
    // Titus's V3 API holds the same rules: Bob can neither kill nor resize Alice's job, nor submit
    // one as her, through it; Alice reads and resizes hers.
    let v3_as = |stem: &'static str| {
        let (addr, tls) = (c.replica(1).api_addr.clone(), tls_of(&c, Some(stem)));
        async move {
            pb::v3::job_management_service_client::JobManagementServiceClient::new(channel(&addr, Some(tls)).await)
        }
    };
    let (mut bob_v3, mut alice_v3) = (v3_as("client-bob").await, v3_as("client-alice").await);
    let s = bob_v3.kill_job(pb::v3::JobId { id: alices.clone() }).await.unwrap_err();
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule job-owner"), "{s:?}");
    let as_alice = pb::v3::JobDescriptor {
        owner: Some(pb::v3::Owner { team_email: "alice@example.com".into() }),
        application_name: "web".into(),
        container: Some(pb::v3::Container {
            resources: Some(pb::v3::ContainerResources { cpu: 1.0, memory_mb: 128, ..Default::default() }),
            image: Some(pb::v3::Image { name: "titus/busybox".into(), tag: "latest".into(), digest: String::new() }),
            command: vec!["sleep".into(), "1".into()],
            ..Default::default()
        }),
        job_spec: Some(pb::v3::job_descriptor::JobSpec::Service(pb::v3::ServiceJobSpec {
            capacity: Some(pb::v3::Capacity { min: 0, desired: 1, max: 2 }),
            enabled: true,
            ..Default::default()
        })),
        ..Default::default()
    };
    let s = bob_v3.create_job(as_alice).await.unwrap_err();
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule job-owner"), "{s:?}");
    let seen = alice_v3.find_job(pb::v3::JobId { id: alices.clone() }).await.unwrap().into_inner();
    assert_eq!(seen.id, alices);
    let resize = pb::v3::JobCapacityUpdate {
        job_id: alices.clone(),
        capacity: Some(pb::v3::Capacity { min: 0, desired: 1, max: 4 }),
    };
    let s = bob_v3.update_job_capacity(resize.clone()).await.unwrap_err();
    assert!(s.code() == Code::PermissionDenied, "{s:?}");
    alice_v3.update_job_capacity(resize).await.unwrap();
    // A command in Alice's container changes her job as much as a kill: Bob is refused (and
    // audited, below); Alice is not, and hears that the task has no container yet.
    let exec =
        |task_id: &str| pb::ExecStart { task_id: task_id.into(), command: vec!["true".into()], ..Default::default() };
    let s = denied(bob.exec_task(exec(&task.id), futures::stream::pending()).await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule job-owner"), "{s:?}");
    let e = alice.exec_task(exec(&task.id), futures::stream::pending()).await.unwrap_err();
    assert!(matches!(e, titus_client::Error::FailedPrecondition(_)), "{e}");
    let s = denied(bob.add_load_balancer(&alices, "arn:aws:elasticloadbalancing:tg/x").await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule job-owner"), "{s:?}");
    let j = admin.find_job(&alices).await.unwrap();
    assert_eq!(j.status.unwrap().state, pb::JobState::JobAccepted as i32);
    // Owners act on their own; an operator (by token) and an admin on anyone's.
    alice.update_job_capacity(&alices, None, Some(2), None).await.unwrap();
    let ops = token_as(&c, "ops-token");
    ops.update_job_capacity(&bobs, None, Some(2), None).await.unwrap();
    admin.kill_job(&bobs).await.unwrap();

    // Roles: membership and step-down are admin-only, the audit log admins' and operators'.
    let s = denied(alice.step_down(Duration::from_secs(5)).await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule cluster-admin"), "{s:?}");
    let s = denied(ops.remove_member(3).await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule cluster-admin"), "{s:?}");
    let s = denied(alice.audit_records(pb::AuditQuery::default()).await.unwrap_err());
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule audit-read"), "{s:?}");
    let s = denied(
        bob.create_capacity_group(titus_client::CapacityGroupSpec::new("g", pb::Tier::Flex, 1.0, 1, 1, 1, 1))
            .await
            .unwrap_err(),
    );
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule capacity-operator"), "{s:?}");

    // The audit log has who did what and how it went, on every replica, and after the leader
    // changes, with new records still coming in.
    wait_until(Duration::from_secs(10), "bob's refused exec audited", || async {
        let r = audit(&ops, "client/bob", "ExecTask").await;
        r.iter().any(|r| r.code == "PermissionDenied").then_some(())
    })
    .await;
    let kills = wait_until(Duration::from_secs(10), "bob's refused kill audited", || async {
        let r = audit(&ops, "client/bob", "KillJob").await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(kills[0].code, "PermissionDenied");
    assert_eq!(kills[0].target, format!("job {alices}"));
    assert!(kills[0].message.contains("rule job-owner"));
    let created = audit(&admin, "client/alice", "CreateJob").await;
    assert!(created.iter().any(|r| r.code == "Ok" && r.target == format!("job {alices}")), "{created:?}");
    let before = c.wait_for_leader(ELECTION).await;
    admin.step_down(Duration::from_secs(10)).await.unwrap();
    let after = c.wait_for_leader(ELECTION).await;
    assert_ne!(before, after);
    admin.kill_job(&alices).await.unwrap();
    for r in &c.replicas {
        // This replica's own answer (the client knows only it).
        let on_one = c.client_of(r.id);
        // Each replica proposes the records of the calls it served in its own batches, retried
        // until they commit: the old leader's record of the step-down may land after the kills.
        let stepped_down = |all: &[pb::AuditRecord]| {
            all.iter().any(|r| r.method.ends_with("StepDown") && r.caller == "client/admin" && r.code == "Ok")
                && all.iter().any(|r| {
                    r.caller == "client/alice" && r.method.ends_with("StepDown") && r.code == "PermissionDenied"
                })
        };
        let records = wait_until(Duration::from_secs(20), "the audit after the leader change", || async {
            let all = audit(&on_one, "", "").await;
            // Bob's refused kills (ours and Titus's V3, audited alike) and the admin's.
            let kills = all.iter().filter(|r| r.method.ends_with("KillJob") && r.target == format!("job {alices}"));
            (kills.count() == 3 && stepped_down(&all)).then_some(all)
        })
        .await;
        assert!(stepped_down(&records), "the admin's step-down and alice's refused one are audited");
        let seqs: Vec<u64> = records.iter().map(|r| r.sequence).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    }
    println!("audit: {} records", audit(&admin, "", "").await.len());
}

/// The first certificate of PEM text, DER.
fn first_cert_der(pem: &str) -> Vec<u8> {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("c.pem");
    std::fs::write(&path, pem).unwrap();
    titus_security::tls::read_cert_der(&path).unwrap()
}

fn der_of(path: &PathBuf) -> Vec<u8> {
    titus_security::tls::read_cert_der(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_certificates_replaced_on_disk_are_used_while_clients_stay_connected() {
    let agent = format!("rot-agent-{}", std::process::id());
    let mut c = Cluster::start_with(3, &[], |dir| Some(setup(dir, &[&agent], "")));
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    c.start_agent_with("rot-agent", 1.0, 512, &["--docker-socket", "/nonexistent.sock"]);
    // Whether the agent's stream is attached to the leader.
    let connected = |want: bool| {
        let (admin, agent) = (admin.clone(), agent.clone());
        move || {
            let (admin, agent) = (admin.clone(), agent.clone());
            async move {
                let agents = admin.find_agents().await.ok()?;
                agents.iter().any(|a| a.id == agent && a.connected == want).then_some(())
            }
        }
    };
    wait_until(Duration::from_secs(30), "the agent attached over TLS", connected(true)).await;

    // A client keeps calling through the rotation; none of its calls may fail.
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (admin, calls, failures, stop) = (admin.clone(), calls.clone(), failures.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let group = titus_client::CapacityGroupSpec::new(&format!("rot-{n}"), pb::Tier::Flex, 1.0, 1, 1, 1, 1);
                match admin.create_capacity_group(group).await {
                    Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("call failed during rotation: {e}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_until(Duration::from_secs(10), "calls flowing", || async {
        (calls.load(Ordering::Relaxed) >= 5).then_some(())
    })
    .await;

    // New certificates (new keys, same CA) for every replica, the agent and the admin client.
    let dir = c.secure.as_ref().unwrap().certs.clone();
    let ca = certs::read_pair(&dir, "ca").unwrap();
    let ids = (1..=3)
        .map(|i| Identity::new(Kind::Replica, i.to_string()).unwrap())
        .chain([Identity::new(Kind::Agent, agent.clone()).unwrap(), Identity::new(Kind::Client, "admin").unwrap()]);
    let rotated_at = std::time::Instant::now();
    for id in ids {
        let pem = certs::issue(&ca, &id, "test", &["127.0.0.1".into()], 1).unwrap();
        certs::write_pair(&dir, &certs::stem(&id), &pem).unwrap();
    }
    let probe = tls_of(&c, None);
    for r in &c.replicas {
        let want = der_of(&dir.join(format!("replica-{}.pem", r.id)));
        for addr in [&r.api_addr, &r.peer_addr] {
            wait_until(Duration::from_secs(10), &format!("{addr} presenting its new certificate"), || async {
                let got = titus_security::tls::server_certificate(addr, &probe).await.ok()?;
                (got == want).then_some(())
            })
            .await;
        }
    }
    println!(
        "every replica presented its new certificate {} ms after the files were replaced",
        rotated_at.elapsed().as_millis()
    );
    // A client started now uses the new client certificate; replicas talk to each other (writes
    // commit) and the old connections go on.
    let fresh = client_as(&c, "client-admin");
    fresh
        .create_capacity_group(titus_client::CapacityGroupSpec::new("after", pb::Tier::Flex, 1.0, 1, 1, 1, 1))
        .await
        .unwrap();
    let before = calls.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "more calls after the rotation", || async {
        (calls.load(Ordering::Relaxed) >= before + 5).then_some(())
    })
    .await;
    // A restarted agent attaches with its new certificate.
    c.kill_agent(&agent);
    wait_until(Duration::from_secs(30), "the killed agent's stream gone", connected(false)).await;
    c.restart_agent(&agent);
    wait_until(Duration::from_secs(30), "the agent re-attached with its new certificate", connected(true)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    println!(
        "{} calls during the rotation, {} failed",
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_rate_and_size_limits_name_their_setting() {
    let extra = "[limits]\nrequests-per-second = 5.0\nburst = 10\nmax-request-bytes = 65536\n";
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[], extra)));
    let r = c.replica(1);
    let bob = tls_of(&c, Some("client-bob"));
    let admin_sdk = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin_sdk.cluster_status().await.ok().filter(|s| s.leader_id != 0) })
        .await;
    let ch = channel(&r.api_addr, Some(bob)).await;
    let mut limited = 0;
    let mut last = tonic::Status::ok("");
    for _ in 0..30 {
        let mut status = pb::cluster_service_client::ClusterServiceClient::new(ch.clone());
        if let Err(s) = status.get_cluster_status(pb::GetClusterStatusRequest {}).await {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            limited += 1;
            last = s;
        }
    }
    println!("30 calls at once, burst 10: {limited} refused");
    assert!(limited >= 15, "{limited}");
    assert!(
        last.message().contains("security.limits.requests-per-second") && last.message().contains("client/bob"),
        "{last:?}"
    );
    // The SDK waits out the limit (the answer says for how long) instead of failing.
    let bob_sdk = client_as(&c, "client-bob");
    let started = std::time::Instant::now();
    for _ in 0..30 {
        bob_sdk.cluster_status().await.unwrap();
    }
    println!("30 SDK calls at 5/s after the burst: {} ms, none failed", started.elapsed().as_millis());
    // Another caller is not held back by Bob.
    let alice = channel(&r.api_addr, Some(tls_of(&c, Some("client-alice")))).await;
    pb::cluster_service_client::ClusterServiceClient::new(alice.clone())
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .unwrap();
    // A request over max-request-bytes is refused before it is decoded.
    let mut big = job("alice@example.com", "web");
    big.attributes.insert("blob".into(), "x".repeat(100_000));
    let s = pb::job_management_service_client::JobManagementServiceClient::new(alice)
        .create_job(pb::CreateJobRequest { job_descriptor: Some(big), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(s.code(), Code::ResourceExhausted | Code::OutOfRange), "{s:?}");
    assert!(s.message().contains("65536"), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_a_new_agent_enrolls_with_a_token_and_attaches_with_its_own_certificate() {
    let enroll = "enroll-token-for-tests";
    let mut c = Cluster::start_with(1, &[], |dir| {
        let token = format!(
            "[[tokens]]\nname = \"bootstrap\"\nsha256 = \"{}\"\nrole = \"enroll\"\n",
            titus_security::token::sha256_hex(enroll)
        );
        let s = setup(dir, &[], &token);
        // Top-level keys go before the file's tables.
        let text = std::fs::read_to_string(&s.security_config).unwrap();
        let top = format!("ca-key = \"{}\"\nenroll-validity-days = 2\n", dir.join("tls/ca.key").display());
        std::fs::write(&s.security_config, format!("{top}{text}")).unwrap();
        Some(s)
    });
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let api = c.replica(1).api_addr.clone();

    // The enroll token enrolls and does nothing else.
    let token_tls = tls_of(&c, None);
    let bearer = format!("Bearer {enroll}");
    let ch = channel(&api, Some(token_tls.clone())).await;
    let s = call_as(ch, "/titus.JobManagementService/FindJobs", Vec::new(), Some(&bearer)).await;
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule client-read"), "{s:?}");
    // A client (even an admin... here a user) cannot enroll without the role.
    let alice = channel(&api, Some(tls_of(&c, Some("client-alice")))).await;
    let request = titus_security::certs::new_csr(&Identity::new(Kind::Agent, "x").unwrap()).unwrap();
    let s = pb::agent_service_client::AgentServiceClient::new(alice)
        .enroll_agent(pb::EnrollAgentRequest { agent_id: "x".into(), csr_pem: request.cert.clone() })
        .await
        .unwrap_err();
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule agent-enroll"), "{s:?}");

    // A real agent with no certificate yet: it enrolls, writes its files, attaches.
    let name = "enrolled";
    let id = format!("{name}-{}", std::process::id());
    let dir = c.dir().join("agent-files");
    let (cert, key) = (dir.join("agent.pem"), dir.join("agent.key"));
    let ca = c.secure.as_ref().unwrap().certs.join("ca.pem");
    c.start_agent_plain(
        name,
        &[
            "--docker-socket",
            "/nonexistent.sock",
            "--tls-ca",
            &ca.display().to_string(),
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
            "--enroll-token",
            enroll,
        ],
    );
    wait_until(Duration::from_secs(60), "the enrolled agent attached", || async {
        let agents = admin.find_agents().await.ok()?;
        agents.iter().any(|a| a.id == id && a.connected).then_some(())
    })
    .await;
    let issued = Identity::from_cert_der(&titus_security::tls::read_cert_der(&cert).unwrap()).unwrap();
    assert_eq!(issued, Identity::new(Kind::Agent, id.clone()).unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // The agent renews its own certificate with it, while attached; not another agent's.
    let agent_files = TlsFiles { ca: ca.clone(), cert_and_key: Some((cert.clone(), key.clone())) };
    let as_agent = channel(&api, Some(Tls::client(agent_files, None).unwrap())).await;
    let renewal = titus_security::certs::new_csr(&Identity::new(Kind::Agent, "x").unwrap()).unwrap();
    let renewed = pb::agent_service_client::AgentServiceClient::new(as_agent.clone())
        .enroll_agent(pb::EnrollAgentRequest { agent_id: id.clone(), csr_pem: renewal.cert.clone() })
        .await
        .expect("an agent renews its own certificate")
        .into_inner();
    let renewed_der = first_cert_der(&renewed.certificate_pem);
    assert_eq!(Identity::from_cert_der(&renewed_der).unwrap(), Identity::new(Kind::Agent, id.clone()).unwrap());
    let s = pb::agent_service_client::AgentServiceClient::new(as_agent)
        .enroll_agent(pb::EnrollAgentRequest { agent_id: "someone-else".into(), csr_pem: renewal.cert })
        .await
        .unwrap_err();
    assert!(s.code() == Code::PermissionDenied && s.message().contains("rule agent-identity"), "{s:?}");
    // Its identity cannot be taken over while it is attached.
    let mut call = tonic::Request::new(pb::EnrollAgentRequest { agent_id: id.clone(), csr_pem: request.cert });
    call.metadata_mut().insert("authorization", format!("Bearer {enroll}").parse().unwrap());
    let s = pb::agent_service_client::AgentServiceClient::new(channel(&api, Some(token_tls.clone())).await)
        .enroll_agent(call)
        .await
        .unwrap_err();
    assert!(s.code() == Code::FailedPrecondition && s.message().contains("is attached"), "{s:?}");
    // Nor once it is gone: the shared token enrolls new agents only (an admin may re-enroll).
    c.kill_agent(&id);
    wait_until(Duration::from_secs(30), "the enrolled agent detached", || async {
        let agents = admin.find_agents().await.ok()?;
        agents.iter().any(|a| a.id == id && !a.connected).then_some(())
    })
    .await;
    let csr = titus_security::certs::new_csr(&Identity::new(Kind::Agent, "x").unwrap()).unwrap();
    let mut call = tonic::Request::new(pb::EnrollAgentRequest { agent_id: id.clone(), csr_pem: csr.cert.clone() });
    call.metadata_mut().insert("authorization", format!("Bearer {enroll}").parse().unwrap());
    let s = pb::agent_service_client::AgentServiceClient::new(channel(&api, Some(token_tls.clone())).await)
        .enroll_agent(call)
        .await
        .unwrap_err();
    assert!(s.code() == Code::FailedPrecondition && s.message().contains("already registered"), "{s:?}");
    let admin_ch = channel(&api, Some(tls_of(&c, Some("client-admin")))).await;
    pb::agent_service_client::AgentServiceClient::new(admin_ch)
        .enroll_agent(pb::EnrollAgentRequest { agent_id: id.clone(), csr_pem: csr.cert })
        .await
        .expect("an admin re-enrolls a known agent");
    let audited = wait_until(Duration::from_secs(10), "enrollments audited", || async {
        let r = audit(&admin, "token/bootstrap", "EnrollAgent").await;
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert_eq!(audited[0].code, "Ok");
    assert_eq!(audited[0].target, format!("agent {id}"));
    assert_eq!(audited[1].code, "FailedPrecondition");
    // Audit records are written in batches: wait for the admin's, not a fixed time.
    wait_until(Duration::from_secs(10), "the admin's enrollment audited", || async {
        audit(&admin, "client/admin", "EnrollAgent").await.iter().any(|r| r.code == "Ok").then_some(())
    })
    .await;
}

/// Writes `text` to `path` aside and renames it (as `titus certs` does), so no reader sees half.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t35_the_ca_is_rotated_without_a_restart_through_a_bundle() {
    let c = Cluster::start_with(3, &[], |dir| Some(setup(dir, &[], "")));
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let dir = c.secure.as_ref().unwrap().certs.clone();
    let old = certs::read_pair(&dir, "ca").unwrap();
    let new = certs::new_ca("new CA", 1).unwrap();
    // A client certificate from the new CA, in its own directory with a bundle.
    let new_dir = c.dir().join("new-tls");
    let carol = Identity::new(Kind::Client, "carol").unwrap();
    certs::write_pair(&new_dir, "client-carol", &certs::issue(&new, &carol, "test", &[], 1).unwrap()).unwrap();
    let client_in = |d: &Path, stem: &str| {
        let options = ClientOptions::default()
            .with_tls(dir.join("ca.pem"), Some((d.join(format!("{stem}.pem")), d.join(format!("{stem}.key")))))
            .unwrap();
        Client::with_options(apis(&c), ClientOptions { deadline: Duration::from_secs(3), ..options }).unwrap()
    };
    assert!(client_in(&new_dir, "client-carol").cluster_status().await.is_err(), "the new CA is not trusted yet");

    // 1. Everyone trusts both CAs: the new CA's client is accepted, nobody restarted.
    replace_file(&dir.join("ca.pem"), &format!("{}{}", old.cert, new.cert));
    wait_until(Duration::from_secs(15), "the bundle trusted by every replica", || async {
        client_in(&new_dir, "client-carol").cluster_status().await.ok()
    })
    .await;
    // 2. Replicas get certificates from the new CA; old and new clients both work.
    for id in 1..=3 {
        let replica = Identity::new(Kind::Replica, id.to_string()).unwrap();
        certs::write_pair(
            &dir,
            &certs::stem(&replica),
            &certs::issue(&new, &replica, "test", &["127.0.0.1".into()], 1).unwrap(),
        )
        .unwrap();
    }
    let probe = tls_of(&c, None);
    for r in &c.replicas {
        let want = der_of(&dir.join(format!("replica-{}.pem", r.id)));
        wait_until(Duration::from_secs(15), "the new CA's replica certificate served", || async {
            (titus_security::tls::server_certificate(&r.api_addr, &probe).await.ok()? == want).then_some(())
        })
        .await;
    }
    admin
        .create_capacity_group(titus_client::CapacityGroupSpec::new("during", pb::Tier::Flex, 1.0, 1, 1, 1, 1))
        .await
        .unwrap();
    client_in(&dir, "client-admin").cluster_status().await.unwrap();
    client_in(&new_dir, "client-carol").cluster_status().await.unwrap();
    // 3. The old CA is dropped: its certificates no longer open connections.
    replace_file(&dir.join("ca.pem"), &new.cert);
    wait_until(Duration::from_secs(15), "the old CA's client refused", || async {
        client_in(&dir, "client-admin").cluster_status().await.is_err().then_some(())
    })
    .await;
    client_in(&new_dir, "client-carol").cluster_status().await.unwrap();
}

/// The unary `ReportTaskStatus` called with an agent's certificate once merged its context
/// unfiltered: an agent could move its task to another agent's books or give it any containerIp
/// (then registered in an ALB). It is filtered like the agent's stream: the `agent` key stays, and
/// a containerIp outside the networks the agent declared (none here) is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_an_agent_s_unary_status_report_is_filtered_like_its_stream() {
    use tokio_stream::StreamExt as _;

    let agent = format!("unary-agent-{}", std::process::id());
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[&agent], "")));
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let api = c.replica(1).api_addr.clone();
    let agent_tls = tls_of(&c, Some(&format!("agent-{agent}")));

    // The agent attaches with room for the task, its stream held open; it declares no networks.
    let mut agents = pb::agent_service_client::AgentServiceClient::new(channel(&api, Some(agent_tls.clone())).await);
    let register = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Register(pb::AgentRegister {
            agent_id: agent.clone(),
            resources: Some(pb::AgentResources {
                cpu: 4.0,
                memory_mb: 4096,
                disk_mb: 10_000,
                network_mbps: 1000,
                gpu: 0,
            }),
            ..Default::default()
        })),
    };
    let outbound = tokio_stream::iter(vec![register]).chain(tokio_stream::pending());
    let _inbound = agents.attach(outbound).await.expect("the agent attaches").into_inner();
    let job = admin.create_job(common::sleeping_service("unary", 0.5, 64, 1)).await.expect("a job");
    let task = wait_until(ELECTION, "the task launched on the agent", || async {
        let tasks = admin.find_tasks(&[("jobIds", job.as_str())], 10, "").await.ok()?.items;
        tasks.into_iter().find(|t| {
            t.task_context.get("agent") == Some(&agent)
                && t.status.as_ref().is_some_and(|s| s.state == pb::TaskState::TaskLaunched as i32)
        })
    })
    .await;

    let report = pb::TaskStatusReport {
        task_id: task.id.clone(),
        state: pb::TaskState::TaskStartInitiated as i32,
        reason_code: String::new(),
        reason_message: String::new(),
        task_context: [("agent", "someone-else"), ("containerIp", "203.0.113.9")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut reports = pb::agent_task_service_client::AgentTaskServiceClient::new(channel(&api, Some(agent_tls)).await);
    reports.report_task_status(report).await.expect("a report on its own task");
    let after = wait_until(ELECTION, "the report applied", || async {
        let t = admin.find_task(&task.id).await.ok()?;
        t.status.as_ref().is_some_and(|s| s.state == pb::TaskState::TaskStartInitiated as i32).then_some(t)
    })
    .await;
    assert_eq!(after.task_context.get("agent"), Some(&agent), "the task stays on its agent: {:?}", after.task_context);
    assert!(
        !after.task_context.contains_key("containerIp"),
        "no address outside the declared networks: {:?}",
        after.task_context
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_tokens_and_environment_values_belong_to_their_owner() {
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[], "")));
    let (admin, alice, bob) =
        (client_as(&c, "client-admin"), client_as(&c, "client-alice"), client_as(&c, "client-bob"));
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let with_secret = || {
        let mut j = job("alice@example.com", "web");
        j.container.as_mut().unwrap().env =
            [("DB_PASSWORD".to_string(), "hunter2".to_string()), ("REGION".to_string(), "us-east-1".to_string())]
                .into_iter()
                .collect();
        j
    };
    let alices = alice.create_job_with_token(with_secret(), "deploy-1").await.unwrap();

    // Bob sending Alice's token with his own spec gets his own job, not hers; her retry gets hers.
    let bobs = bob.create_job_with_token(job("bob@example.com", "bobs-app"), "deploy-1").await.unwrap();
    assert_ne!(bobs, alices, "bob's call answered alice's job");
    assert_eq!(bob.find_job(&bobs).await.unwrap().job_descriptor.unwrap().application_name, "bobs-app");
    assert_eq!(alice.create_job_with_token(with_secret(), "deploy-1").await.unwrap(), alices);
    let created = wait_until(Duration::from_secs(10), "bob's CreateJob audited", || async {
        let r = audit(&admin, "client/bob", "CreateJob").await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert!(
        created.iter().all(|r| r.target != format!("job {alices}")),
        "bob is recorded creating alice's job: {created:?}"
    );

    // The environment's values are the owner's: names stay visible to everyone.
    let env_of = |j: pb::Job| j.job_descriptor.unwrap().container.unwrap().env;
    let ops = token_as(&c, "ops-token");
    for (who, client) in [("alice", &alice), ("admin", &admin)] {
        let env = env_of(client.find_job(&alices).await.unwrap());
        assert_eq!(env.get("DB_PASSWORD").map(String::as_str), Some("hunter2"), "{who} reads the owner's values");
    }
    for (who, client) in [("bob", &bob), ("an operator", &ops)] {
        let env = env_of(client.find_job(&alices).await.unwrap());
        assert_eq!(env.len(), 2, "{who} sees every name: {env:?}");
        assert!(env.values().all(|v| v == "<redacted>"), "{who} read alice's values: {env:?}");
        let listed = client.find_jobs(&[("jobIds", alices.as_str())], 10, "").await.unwrap();
        let env = env_of(listed.items.into_iter().next().expect("alice's job listed"));
        assert!(env.values().all(|v| v == "<redacted>"), "{who} read alice's values in a list: {env:?}");
        let mut observer = client.observe_job(&alices);
        let first = observer.next().await.unwrap();
        let Some(pb::job_change_notification::Notification::JobUpdate(update)) = first.notification else {
            panic!("the first notification is the job: {first:?}")
        };
        let env = env_of(update.job.unwrap());
        assert!(env.values().all(|v| v == "<redacted>"), "{who} read alice's values in a stream: {env:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_thousands_of_idle_connections_from_one_address_do_not_keep_an_admin_out() {
    use tower_service::Service as _;
    let extra = "[limits]\nunauthenticated-timeout-ms = 3000\n";
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[], extra)));
    let r = c.replica(1);
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;

    // 3,000 TLS connections without a certificate that never make a call, all from 127.0.0.1.
    let anonymous = tls_of(&c, None);
    let mut idle = Vec::new();
    let uri: http::Uri = format!("http://{}", r.api_addr).parse().unwrap();
    for _ in 0..3000 {
        let mut connector = Connector::new(Some(anonymous.clone()), Duration::from_secs(5));
        if let Ok(conn) = connector.call(uri.clone()).await {
            idle.push(conn);
        }
    }
    println!("{} idle TLS connections open", idle.len());
    assert!(idle.len() > 2000, "the flood itself could not connect: {}", idle.len());

    // An admin (a certificate) and an operator (a token, no certificate) still get in at once.
    let t0 = std::time::Instant::now();
    let fresh_admin = client_as(&c, "client-admin");
    fresh_admin.cluster_status().await.expect("an admin call during the flood");
    let admin_took = t0.elapsed();
    let t0 = std::time::Instant::now();
    let ops = token_as(&c, "ops-token");
    ops.cluster_status().await.expect("a token call during the flood");
    let ops_took = t0.elapsed();
    println!("during the flood: admin call {admin_took:?}, token call {ops_took:?}");
    assert!(admin_took < Duration::from_secs(1), "the admin waited {admin_took:?}");
    assert!(ops_took < Duration::from_secs(1), "the token caller waited {ops_took:?}");

    // The flood was held to the per-address bound, evictions counted, and what was left closes at
    // the timeout while the authenticated clients keep working.
    let samples = scrape(&r.admin_addr).await;
    let closed =
        |reason: &str| value(&samples, "titus_connections_refused_total", &[("port", "api"), ("reason", reason)]);
    let (evicted, timed_out) = (closed("evicted"), closed("timed_out"));
    let unauthenticated = value(&samples, "titus_connections", &[("port", "api"), ("state", "unauthenticated")]);
    println!("evicted {evicted}, timed out {timed_out}, unauthenticated now {unauthenticated}");
    // Which of the two closed a connection depends on how fast the flood connected.
    assert!(evicted + timed_out >= 2000.0, "{evicted} + {timed_out}");
    assert!(unauthenticated <= 256.0, "{unauthenticated}");
    wait_until(Duration::from_secs(20), "the idle connections timed out", || async {
        let samples = scrape(&r.admin_addr).await;
        let left = value(&samples, "titus_connections", &[("port", "api"), ("state", "unauthenticated")]);
        let timed_out = value(&samples, "titus_connections_refused_total", &[("port", "api"), ("reason", "timed_out")]);
        (left == 0.0 && timed_out > 0.0).then_some(())
    })
    .await;
    drop(idle);
    fresh_admin.cluster_status().await.expect("the admin's connection outlived the timeout");
    ops.cluster_status().await.expect("the token caller's connection outlived the timeout");
}

/// A service job of no tasks whose environment takes it near the 256 KiB bound on a job.
fn maximal_job(owner: &str, app: &str) -> pb::JobDescriptor {
    let mut j = job(owner, app);
    let c = j.container.as_mut().unwrap();
    c.env = (0..60).map(|i| (format!("V{i}"), "x".repeat(4096))).collect();
    if let Some(pb::job_descriptor::JobType::Service(s)) = j.job_type.as_mut() {
        s.capacity = Some(pb::Capacity { min: 0, desired: 0, max: 1 });
    }
    j
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t90_one_user_sending_maximal_jobs_is_slowed_by_their_bytes_and_another_s_writes_keep_their_latency() {
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[], "")));
    let r = c.replica(1);
    let alice = client_as(&c, "client-alice");
    wait_until(ELECTION, "a leader", || async { alice.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let mut small = job("alice@example.com", "web");
    if let Some(pb::job_descriptor::JobType::Service(s)) = small.job_type.as_mut() {
        s.capacity = Some(pb::Capacity { min: 0, desired: 0, max: 1 });
    }
    let timed = |n: usize| {
        let (alice, small) = (alice.clone(), small.clone());
        async move {
            let mut took = Vec::new();
            for _ in 0..n {
                let t0 = std::time::Instant::now();
                alice.create_job(small.clone()).await.expect("alice's CreateJob");
                took.push(t0.elapsed());
            }
            took
        }
    };
    timed(5).await;
    let idle = p99(timed(100).await);

    // Bob, on four connections, sends maximal jobs as fast as the replica lets him.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sent, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flood = Vec::new();
    let flood_began = std::time::Instant::now();
    for _ in 0..4 {
        let ch = channel(&r.api_addr, Some(tls_of(&c, Some("client-bob")))).await;
        let (stop, sent, refused) = (stop.clone(), sent.clone(), refused.clone());
        let body = pb::CreateJobRequest {
            job_descriptor: Some(maximal_job("bob@example.com", "bobs-app")),
            idempotency_token: String::new(),
        };
        flood.push(tokio::spawn(async move {
            let mut jobs = pb::job_management_service_client::JobManagementServiceClient::new(ch)
                .max_encoding_message_size(8 << 20);
            while !stop.load(Ordering::Relaxed) {
                match jobs.create_job(body.clone()).await {
                    Ok(_) => sent.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        assert!(s.message().contains("client/bob"), "{s:?}");
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(s) => panic!("bob's flood: {s:?}"),
                };
            }
        }));
    }
    // Past bob's byte burst (8 MiB: some 32 maximal jobs) before alice is measured.
    wait_until(Duration::from_secs(60), "bob's burst spent", || async {
        (refused.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let loaded = p99(timed(200).await);
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    let (sent, refused) = (sent.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    println!("alice's CreateJob p99: idle {idle:?}, during bob's flood {loaded:?}; bob: {sent} maximal jobs accepted, {refused} refused in all");
    // The bound is 10x the idle p99; an idle p99 below 10 ms counts as 10 ms, so that scheduling
    // noise on a small machine is not mistaken for one tenant hurting another.
    let bound = idle.max(Duration::from_millis(10)) * 10;
    assert!(loaded < bound, "alice's p99 went from {idle:?} to {loaded:?} while bob flooded");
    // Bob got through at about his byte rate (1 MiB/s after an 8 MiB burst), not at his call rate.
    let flooded = flood_began.elapsed().as_secs_f64();
    let allowed = (8.0 + flooded + 1.0) * 1024.0 * 1024.0 / (245.0 * 1024.0);
    assert!((sent as f64) < allowed, "bob sent {sent} maximal jobs, more than his bytes allow ({allowed:.0})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_the_security_file_is_reloaded_a_bad_one_is_refused_and_a_certificate_is_revoked() {
    let c = Cluster::start_with(1, &[], |dir| Some(setup(dir, &[], "")));
    let secure = c.secure.as_ref().unwrap();
    let (file, certs_dir) = (secure.security_config.clone(), secure.certs.clone());
    let admin = client_as(&c, "client-admin");
    wait_until(ELECTION, "a leader", || async { admin.cluster_status().await.ok().filter(|s| s.leader_id != 0) }).await;
    let carol = token_as(&c, "carol-token");
    let status = denied(carol.cluster_status().await.unwrap_err());
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A token added to the file works without a restart.
    let original = std::fs::read_to_string(&file).unwrap();
    let with_carol = format!(
        "{original}\n[[tokens]]\nname = \"carol\"\nsha256 = \"{}\"\nrole = \"user\"\n",
        titus_security::token::sha256_hex("carol-token")
    );
    std::fs::write(&file, &with_carol).unwrap();
    wait_until(Duration::from_secs(15), "carol's token taken", || async { carol.cluster_status().await.ok() }).await;

    // A broken file keeps the settings in force, and the replica says why.
    std::fs::write(&file, format!("{with_carol}\n[[principals]]\nname = \"x\"\nrole = \"superuser\"\n")).unwrap();
    wait_until(Duration::from_secs(15), "the bad file refused", || async {
        std::fs::read_to_string(&c.replica(1).log)
            .unwrap_or_default()
            .contains("security settings not reloaded")
            .then_some(())
    })
    .await;
    assert!(
        std::fs::read_to_string(&c.replica(1).log).unwrap_or_default().contains("superuser"),
        "the refusal names what is wrong"
    );
    carol.cluster_status().await.expect("the settings in force stay");

    // Revoking alice's certificate by its serial (as openssl prints it) shuts her out; bob stays.
    let alice = client_as(&c, "client-alice");
    alice.cluster_status().await.expect("alice before the revocation");
    let serial = titus_security::identity::serial_hex(&der_of(&certs_dir.join("client-alice.pem"))).unwrap();
    let printed = serial.to_uppercase();
    // (TOML: a top-level key after a table would belong to it, so the revocation goes first.)
    std::fs::write(&file, format!("revoked-serials = [\"serial={printed}\"]\n{with_carol}")).unwrap();
    let status = wait_until(Duration::from_secs(15), "alice refused", || async {
        alice.cluster_status().await.err().map(denied).filter(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    assert!(status.message().contains("revoked") && status.message().contains(&serial), "{status:?}");
    client_as(&c, "client-bob").cluster_status().await.expect("bob is not revoked");
    carol.cluster_status().await.expect("tokens are not affected");
}
