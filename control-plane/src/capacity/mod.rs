//! EC2 capacity for instance groups that carry launch settings: a pure planner ([`plan`]) and the
//! leader duty that runs it against EC2 ([`duty`]).

pub mod apply;
pub mod duty;
pub mod plan;
