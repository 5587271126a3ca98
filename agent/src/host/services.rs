//! Stopping, starting and querying the host's BlueMind services with their configured
//! commands: stop in configured order, start in reverse order, stop at the first failure.

use std::time::Duration;

use bmfleet_proto::v1::{ServiceAction, ServicesReply};

use crate::command;
use crate::config::ServicesConfig;

/// Runs `action` over the configured services and reports every command that ran.
pub async fn run(config: &ServicesConfig, action: ServiceAction) -> ServicesReply {
    let timeout = Duration::from_secs(config.command_timeout_secs);
    let mut reply = ServicesReply {
        ok: true,
        ..Default::default()
    };
    let ordered: Vec<_> = match action {
        ServiceAction::Start => config.service.iter().rev().collect(),
        _ => config.service.iter().collect(),
    };
    for service in ordered {
        let argv = match action {
            ServiceAction::Start => &service.start,
            ServiceAction::Stop => &service.stop,
            _ => &service.status,
        };
        let result = command::run(&service.name, argv, timeout).await;
        let ok = command::succeeded(&result);
        if !ok {
            tracing::warn!(
                service = %service.name,
                action = action.as_str_name(),
                failure = %command::failure_summary(&result),
                "service command failed"
            );
        }
        reply.commands.push(result);
        reply.ok &= ok;
        // A failed stop or start must not go on to the next service: the caller decides.
        if !ok && action != ServiceAction::Status {
            break;
        }
    }
    reply
}
