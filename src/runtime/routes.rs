//! Where clients from outside reach an app: a service's route, and the app's balancers.

use serde::Serialize;

/// Where clients from outside reach a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// Every host name (or address) that reaches it, the main one first.
    pub hosts: Vec<String>,
    /// The port clients connect to.
    pub port: u16,
}

/// An extra load balancer of an app (convox.yml `balancers:`), as convox shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerInfo {
    pub name: String,
    /// The service it sends traffic to.
    pub service: String,
    /// Its address once the cluster has given it one (empty until then).
    pub endpoint: String,
    pub ports: Vec<BalancerPortInfo>,
}

/// One port of a balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerPortInfo {
    pub protocol: String,
    /// The port the balancer listens on.
    pub source: u16,
    /// The service's port.
    pub target: u16,
}
