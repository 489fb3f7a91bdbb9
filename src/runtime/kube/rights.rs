//! Waiting for rack's rights in a namespace it has just made. The API server authorises from a
//! cache of RoleBindings, so for a moment after rack binds itself in a new namespace (longer on
//! a loaded control plane) its own requests there are refused with 403; a resource created in
//! `rack-system` right after the namespace failed that way in a test run. rack asks the API
//! server, as itself, whether it may act there yet, and goes on only once it may.

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::runtime::RuntimeError;

/// How long a new RoleBinding may take to be in effect before rack gives up.
const LIMIT: Duration = Duration::from_secs(60);

/// Waits until rack may read Deployments in `namespace` (one of the rights its RoleBinding
/// there grants: they come together or not at all).
pub(super) async fn wait_for_rights(client: &Client, namespace: &str) -> Result<(), RuntimeError> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                group: Some("apps".to_owned()),
                resource: Some("deployments".to_owned()),
                verb: Some("get".to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut pause = Duration::from_millis(10);
    loop {
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(RuntimeError::kube(format!(
                "asking for rack's rights in namespace {namespace}"
            )))?;
        if answer.status.is_some_and(|status| status.allowed) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RuntimeError::Failed(format!(
                "rack's RoleBinding in namespace {namespace} is not in effect after {}s: check that \
                 rack's ClusterRole may bind rack-app (docker/k8s/rbac.yaml)",
                LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
