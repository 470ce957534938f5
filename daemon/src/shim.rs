//! TEMPORARY stand-ins for mesh_proto::config and mesh_proto::control until they land.
#![allow(dead_code, missing_docs)]
pub mod control {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub enum Request {
        Peers,
        Status,
        Reload,
    }
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub enum Response {
        Peers(Vec<String>),
        Status(String),
        Ok,
        Error(String),
    }
}
