//! The placement core of the Titus scheduler: a pure function of a read-only cluster view, the
//! pending tasks and the configuration, returning a plan. No IO, no clock, no tokio — the leader
//! builds the view from replicated state, calls [`schedule`], and proposes the plan through Raft,
//! where every placement is checked again when applied.

pub mod plan;
pub mod resources;
pub mod view;

pub use plan::{schedule, Config, Fitness, Placement, Plan, Reason, ReasonKind, Unplaced};
pub use resources::Resources;
pub use view::{Agent, Constraints, Group, Ineligible, Task, Tier};
