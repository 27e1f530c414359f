//! titus-chaos: fault injection against a running deployment. Built in the chaos issue.
