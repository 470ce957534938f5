//! The one way meshd opens rtnetlink: a connection whose driver runs as a tokio task. Must be
//! called inside a tokio runtime.

use rtnetlink::Handle;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// A connection for the life of its handles (the agent's link and routes).
pub fn connect() -> Result<Handle> {
    Ok(open()?.0)
}

/// A connection for one short job: its driver stops when this is dropped.
pub struct Scoped {
    pub handle: Handle,
    driver: JoinHandle<()>,
}

impl Scoped {
    pub fn open() -> Result<Scoped> {
        let (handle, driver) = open()?;
        Ok(Scoped { handle, driver })
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

fn open() -> Result<(Handle, JoinHandle<()>)> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| Error::io("cannot open a netlink socket", e))?;
    Ok((handle, tokio::spawn(connection)))
}
