//! The process: starting up (`startup`: configuration, instance lock, key, control socket,
//! coordinator role), the event loop that owns the agent (`event_loop`), control requests
//! (`control_socket` reads them, `dispatch` answers them), and the plumbing around it:
//! settings, sd_notify, TCP servers with limits, and running blocking work off the async
//! workers.

pub mod blocking;
pub mod control_socket;
pub mod dispatch;
pub mod event_loop;
pub mod instance_lock;
pub mod sd_notify;
pub mod serve;
pub mod settings;
pub mod startup;
