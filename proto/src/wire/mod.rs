//! What crosses a process boundary: the coordinator's HTTP API (`api`) and its proof of key
//! (`auth`), the control socket between meshctl and meshd (`control`), invitation tokens
//! (`token`), coordinator key notices (`notice`), and the WireGuard UAPI text protocol
//! (`uapi`). Types and their encodings only; nothing here is rendered for people
//! (`crate::render` is).

pub mod api;
pub mod auth;
pub mod control;
pub mod icmp;
pub mod notice;
pub mod token;
pub mod uapi;
