//! titus-agent: runs a host's containers through the local Docker daemon and follows the
//! control plane's leader. Built in the agent issue; the crate exists so the workspace is whole.
