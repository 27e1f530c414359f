//! What an agent sends on its stream (the agent port): protobuf decoding and the conversion to what
//! enters the log must never panic, whatever the bytes; and whatever the conversion accepts must be
//! loggable — it encodes to bytes that decode to the same command — since a value that did not read
//! back (a NaN CPU count in a registration) once made every replica fail to read its own log.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use titus_model::codec;
use titus_model::command::Command;
use titus_model::convert::{agent_from_register, agent_report, container_networks, MAX_AGENT_REASON_LEN};
use titus_proto as pb;

fn loggable(command: Command) {
    let bytes = codec::encode_verified(&command).expect("an accepted agent message is loggable");
    let again: Command = codec::decode(&bytes).expect("decodes");
    assert_eq!(again, command, "the round trip changed the command");
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = pb::AgentMessage::decode(data) else { return };
    match message.message {
        Some(pb::agent_message::Message::Register(reg)) => {
            if let Ok(agent) = agent_from_register(&reg, 1) {
                loggable(Command::RegisterAgent { agent });
            }
            let _ = container_networks(&reg.container_networks, &[]);
        }
        Some(pb::agent_message::Message::Status(task)) => {
            let networks = container_networks(&["10.0.0.0/8".to_string()], &[]).unwrap_or_default();
            if let Ok(report) = agent_report("agent-1", task, 1, &networks) {
                assert!(report.status.reason_message.len() <= MAX_AGENT_REASON_LEN);
                loggable(Command::UpdateTaskStatuses { reports: vec![report] });
            }
        }
        Some(pb::agent_message::Message::Heartbeat(h)) => loggable(Command::SetAgentHealth {
            agent_id: "agent-1".into(),
            healthy: h.healthy,
            reason: titus_model::bounded(h.unhealthy_reason, MAX_AGENT_REASON_LEN),
        }),
        None => {}
    }
});
