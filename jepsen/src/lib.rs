//! titus-jepsen: a black-box correctness suite. Real `titus-control-plane` replicas (and agents),
//! each in its own network namespace, run client workloads through the SDK while nemeses partition,
//! kill, pause, skew and reconfigure them; the recorded history (Jepsen's :invoke/:ok/:fail/:info)
//! is checked — linearizability of a register per job, no lost or duplicated job submissions, one
//! commit order for every ObserveJobs client, no task in two containers.

pub mod aws;
pub mod checks;
pub mod edn;
pub mod history;
pub mod linear;
pub mod nemesis;
pub mod report;
pub mod workloads;
