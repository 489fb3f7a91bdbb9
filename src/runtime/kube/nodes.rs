//! The cluster's nodes as convox instances: capacity and allocatable from each node's status
//! (usage needs the metrics API, which rack does not ask: 0), ready or not, its addresses.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::runtime::{InstanceInfo, RuntimeError};

/// Every node of the cluster.
pub async fn list(client: &Client) -> Result<Vec<InstanceInfo>, RuntimeError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(RuntimeError::kube("listing the cluster's nodes"))?;
    Ok(nodes.items.into_iter().map(instance).collect())
}

fn instance(node: Node) -> InstanceInfo {
    let status = node.status.unwrap_or_default();
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let address = |kind: &str| {
        status
            .addresses
            .iter()
            .flatten()
            .find(|a| a.type_ == kind)
            .map(|a| a.address.clone())
            .unwrap_or_default()
    };
    let capacity = status.capacity.unwrap_or_default();
    let allocatable = status.allocatable.unwrap_or_default();
    let cores = |map: &std::collections::BTreeMap<String, Quantity>| map.get("cpu").map_or(0.0, |q| quantity(&q.0));
    let mebibytes = |map: &std::collections::BTreeMap<String, Quantity>| {
        map.get("memory").map_or(0.0, |q| quantity(&q.0) / 1_048_576.0)
    };
    let gpus = |map: &std::collections::BTreeMap<String, Quantity>| {
        map.get("nvidia.com/gpu").map_or(0, |q| quantity(&q.0) as u32)
    };
    InstanceInfo {
        agent: false,
        cpu: 0.0,
        cpu_capacity: cores(&capacity),
        cpu_allocatable: cores(&allocatable),
        gpu_capacity: gpus(&capacity),
        gpu_allocatable: gpus(&allocatable),
        id: node.metadata.name.unwrap_or_default(),
        memory: 0.0,
        memory_capacity: mebibytes(&capacity),
        memory_allocatable: mebibytes(&allocatable),
        private_ip: address("InternalIP"),
        processes: 0,
        public_ip: address("ExternalIP"),
        status: if ready { "running" } else { "pending" }.to_owned(),
        started: node
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(super::time)
            .unwrap_or(chrono::DateTime::UNIX_EPOCH),
    }
}

/// A Kubernetes quantity (`3800m`, `4`, `16Gi`, `1e3`) as a number of its unit.
pub(super) fn quantity(text: &str) -> f64 {
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in suffixes {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().map_or(0.0, |n| n * factor);
        }
    }
    text.parse().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::quantity;

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        assert!((quantity("3800m") - 3.8).abs() < 1e-9);
        assert!((quantity("4") - 4.0).abs() < 1e-9);
        assert!((quantity("16Gi") - 17_179_869_184.0).abs() < 1.0);
        assert!((quantity("1000Ki") - 1_024_000.0).abs() < 1e-6);
        assert!((quantity("1e3") - 1000.0).abs() < 1e-9);
        assert!(quantity("junk").abs() < 1e-9);
    }
}
