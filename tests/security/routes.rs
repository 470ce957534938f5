//! Security suite (routes): attacks from docs/SECURITY.md run against the lab, each asserting that
//! the attack fails and that the mesh still works afterwards.
