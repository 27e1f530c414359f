//! titus-jepsen: black-box correctness suite against real binaries. Built in the Jepsen issue.
