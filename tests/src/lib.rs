//! meshlab: the whole meshd fleet rehearsed on one machine, out of namespaces (tests/README.md).
//!
//! ```no_run
//! use std::time::Duration;
//! use meshlab::{Fleet, Lab, LabOpts};
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::build(LabOpts::default())?;          // torn down when dropped
//! let fleet = Fleet::standard(lab.bin_dir())?;
//! lab.install_fleet(&fleet)?;
//! for h in fleet.names() {
//!     lab.start_meshd(h)?;
//! }
//! lab.wait_mesh_pings(&fleet.names(), Duration::from_secs(60))?;
//! println!("{}", lab.exec_ok("dock-prod", &["wg", "show", "wgmesh0"])?);
//! # Ok(()) }
//! ```
//!
//! Safety rules the code keeps: every namespace is new and carries the run's id; nothing is
//! configured in the root namespace (veths are created from inside the switch namespace
//! directly into the hosts'); processes are only ever signalled by recorded PID + start time,
//! or because they live in a namespace this lab created; waiting is polling with a deadline.

pub mod boot;
pub mod coord;
pub mod fleet;
pub mod lab;
pub mod poll;
pub mod procs;
pub mod root;
pub mod rotate;
pub mod state;
pub mod topology;
pub mod vm;

pub use coord::{HostEntry, JoinMode, ManagedFleet, COORDINATOR, NAS};
pub use fleet::{engine_command, generate_keypair, Fleet, FleetHost};
pub use lab::{bin_dir, check_output, cleanup, one_lab_at_a_time, status_answered, Lab, LabOpts};
pub use poll::{poll_for, poll_until};
pub use procs::ProcId;
pub use root::RootSnapshot;
pub use state::{state_root, LabState};
pub use topology::{DAEMON_HOSTS, MESH_IFACE, MESH_PORT};
pub use vm::{run_in_vm, VmOpts, VmRun};
