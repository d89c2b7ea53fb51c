//! Who a workload's token belongs to, as the API server says: the authenticator of the
//! identity endpoint in a cluster.
//!
//! A sidecar proves itself with its pod's projected ServiceAccount token, audience
//! [`AUDIENCE`]. The operator asks the API server about it with a TokenReview (so an expired
//! token, one for another audience, or one whose pod is gone is refused by the server that
//! issued it), then maps the ServiceAccount to a workload: it must carry the label
//! `weir.dev/microservice: <name>` (or `weir.dev/saga`) and be owned by that Microservice (or
//! Saga) in the same namespace, the live object by its uid, as the ServiceAccounts the operator
//! renders are. A ServiceAccount a user made with the same name, without that owner, or one
//! left from an earlier object of that name, names no workload.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use weir_identity::WorkloadId;
use weir_identity::endpoint::{AuthError, AuthFuture, Authenticate};

/// The audience of the tokens sidecars present.
pub const AUDIENCE: &str = "weir";

/// The label of a ServiceAccount rendered for a Microservice (the same as on its other objects).
const LABEL_MICROSERVICE: &str = "weir.dev/microservice";
/// The label of a ServiceAccount rendered for a Saga's coordinator.
const LABEL_SAGA: &str = "weir.dev/saga";

/// Authenticates tokens with TokenReview.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
    trust_domain: String,
}

impl TokenReviewer {
    pub fn new(client: Client, trust_domain: &str) -> Self {
        TokenReviewer {
            client,
            trust_domain: trust_domain.into(),
        }
    }

    async fn review(&self, token: &str) -> Result<WorkloadId, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Unauthenticated(match status.error {
                Some(e) if !e.is_empty() => format!("the API server did not authenticate it: {e}"),
                _ => "the API server did not authenticate it".into(),
            }));
        }
        // An API server that ignores audiences (none set) would accept any of the pod's tokens.
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == AUDIENCE)
        {
            return Err(AuthError::Unauthenticated(format!(
                "the token is not for the audience {AUDIENCE:?}"
            )));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        let Some((namespace, account)) = user
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Err(AuthError::Forbidden(format!(
                "{user:?} is not a ServiceAccount"
            )));
        };
        let sa = match Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .get_opt(account)
            .await
        {
            Ok(Some(sa)) => sa,
            Ok(None) => {
                return Err(AuthError::Forbidden(format!(
                    "ServiceAccount {namespace}/{account} is gone"
                )));
            }
            Err(e) => return Err(AuthError::Unavailable(format!("ServiceAccount: {e}"))),
        };
        let id = workload_of(&sa, namespace, &self.trust_domain).ok_or_else(|| {
            AuthError::Forbidden(format!(
                "ServiceAccount {namespace}/{account} is not one Weir rendered for a Microservice or a Saga"
            ))
        })?;
        // The owner named must be the live object, not an earlier one of the same name: an
        // account left behind (or made with a copied owner reference) names nobody.
        let live_uid = match id.kind {
            weir_identity::WorkloadKind::Microservice => {
                Api::<weir_crds::Microservice>::namespaced(self.client.clone(), namespace)
                    .get_opt(&id.name)
                    .await
                    .map(|o| o.and_then(|o| o.metadata.uid))
            }
            weir_identity::WorkloadKind::Saga => {
                Api::<weir_crds::Saga>::namespaced(self.client.clone(), namespace)
                    .get_opt(&id.name)
                    .await
                    .map(|o| o.and_then(|o| o.metadata.uid))
            }
        }
        .map_err(|e| AuthError::Unavailable(format!("the account's owner: {e}")))?;
        let owned_by_live = live_uid
            .as_deref()
            .is_some_and(|uid| sa.owner_references().iter().any(|o| o.uid == uid));
        if !owned_by_live {
            return Err(AuthError::Forbidden(format!(
                "ServiceAccount {namespace}/{account} is owned by no live {}",
                id.short()
            )));
        }
        Ok(id)
    }
}

/// The workload a ServiceAccount was rendered for: its label names it and that object owns it.
pub(crate) fn workload_of(
    sa: &ServiceAccount,
    namespace: &str,
    trust_domain: &str,
) -> Option<WorkloadId> {
    let labels = sa.labels();
    let owned_by = |kind: &str, name: &str| {
        sa.owner_references()
            .iter()
            .any(|o| o.kind == kind && o.name == name && o.api_version.starts_with("weir.dev/"))
    };
    if let Some(name) = labels.get(LABEL_MICROSERVICE)
        && owned_by("Microservice", name)
    {
        return Some(WorkloadId::microservice(trust_domain, namespace, name));
    }
    if let Some(name) = labels.get(LABEL_SAGA)
        && owned_by("Saga", name)
    {
        return Some(WorkloadId::saga(trust_domain, namespace, name));
    }
    None
}

impl Authenticate for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(self.review(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::mock_api::{context, expect, serve};
    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

    fn reviewed(status: Value) -> impl Fn(&Value) -> (StatusCode, Value) {
        move |req| {
            assert_eq!(req["spec"]["audiences"], json!([AUDIENCE]));
            assert_eq!(req["spec"]["token"], "tok");
            let mut answer = req.clone();
            answer["status"] = status.clone();
            (StatusCode::CREATED, answer)
        }
    }

    fn authenticated(user: &str) -> Value {
        json!({"authenticated": true, "audiences": [AUDIENCE], "user": {"username": user}})
    }

    fn sa(labels: Value, owner: Option<(&str, &str)>) -> Value {
        let owners: Vec<Value> = owner
            .map(|(kind, name)| {
                json!({"apiVersion": "weir.dev/v1alpha1", "kind": kind, "name": name,
                       "uid": "u-1", "controller": true})
            })
            .into_iter()
            .collect();
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "orders", "namespace": "shop", "labels": labels,
                            "ownerReferences": owners}})
    }

    /// The review authenticates `system:serviceaccount:shop:orders`; the ServiceAccount's GET
    /// answers `answer`.
    fn orders_account(answer: (StatusCode, Value)) -> Vec<crate::operator::mock_api::Expect> {
        vec![
            expect(
                Method::POST,
                REVIEWS,
                reviewed(authenticated("system:serviceaccount:shop:orders")),
            ),
            expect(
                Method::GET,
                "/api/v1/namespaces/shop/serviceaccounts/orders",
                move |_| answer.clone(),
            ),
        ]
    }

    async fn run(script: Vec<crate::operator::mock_api::Expect>) -> Result<WorkloadId, AuthError> {
        let (ctx, handle) = context();
        let server = tokio::spawn(serve(handle, script));
        let out = TokenReviewer::new(ctx.client.clone(), "cluster.local")
            .authenticate("tok")
            .await;
        server.await.unwrap();
        out
    }

    /// The live owner's GET, answering an object of `uid` (`None`: gone).
    fn owner(path: &str, uid: Option<&'static str>) -> crate::operator::mock_api::Expect {
        expect(Method::GET, path, move |_| match uid {
            Some(uid) => (
                StatusCode::OK,
                json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
                       "metadata": {"name": "orders", "namespace": "shop", "uid": uid},
                       "spec": {"image": "o", "port": 1}}),
            ),
            None => (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        })
    }

    const ORDERS: &str = "/apis/weir.dev/v1alpha1/namespaces/shop/microservices/orders";

    #[tokio::test]
    async fn a_rendered_service_account_maps_to_its_microservice() {
        let account = || {
            (
                StatusCode::OK,
                sa(
                    json!({"weir.dev/microservice": "orders"}),
                    Some(("Microservice", "orders")),
                ),
            )
        };
        let mut script = orders_account(account());
        script.push(owner(ORDERS, Some("u-1")));
        assert_eq!(
            run(script).await,
            Ok(WorkloadId::microservice("cluster.local", "shop", "orders"))
        );
        // An account left from an earlier orders (another uid), or whose orders is gone.
        for live in [Some("u-2"), None] {
            let mut script = orders_account(account());
            script.push(owner(ORDERS, live));
            let out = run(script).await;
            assert!(
                matches!(&out, Err(AuthError::Forbidden(m)) if m.contains("owned by no live shop/orders")),
                "{live:?}: {out:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_token_the_api_server_refuses_or_for_another_audience_is_unauthenticated() {
        let out = run(vec![expect(
            Method::POST,
            REVIEWS,
            reviewed(json!({"authenticated": false, "error": "token has expired"})),
        )])
        .await;
        assert_eq!(
            out,
            Err(AuthError::Unauthenticated(
                "the API server did not authenticate it: token has expired".into()
            ))
        );
        let out = run(vec![expect(
            Method::POST,
            REVIEWS,
            reviewed(
                json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                            "user": {"username": "system:serviceaccount:shop:orders"}}),
            ),
        )])
        .await;
        assert!(
            matches!(&out, Err(AuthError::Unauthenticated(m)) if m.contains("audience")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn accounts_weir_did_not_render_name_no_workload() {
        // A user, not a ServiceAccount.
        let out = run(vec![expect(
            Method::POST,
            REVIEWS,
            reviewed(authenticated("alice")),
        )])
        .await;
        assert!(matches!(out, Err(AuthError::Forbidden(_))), "{out:?}");
        // A ServiceAccount with the label but no owner (a user's own, same name).
        let out = run(orders_account((
            StatusCode::OK,
            sa(json!({"weir.dev/microservice": "orders"}), None),
        )))
        .await;
        assert!(
            matches!(&out, Err(AuthError::Forbidden(m)) if m.contains("not one Weir rendered")),
            "{out:?}"
        );
        // Labelled for payments, owned by orders: no.
        let out = run(orders_account((
            StatusCode::OK,
            sa(
                json!({"weir.dev/microservice": "payments"}),
                Some(("Microservice", "orders")),
            ),
        )))
        .await;
        assert!(matches!(out, Err(AuthError::Forbidden(_))), "{out:?}");
        // Gone.
        let out = run(orders_account((
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "code": 404, "message": "not found"}),
        )))
        .await;
        assert!(
            matches!(&out, Err(AuthError::Forbidden(m)) if m.contains("gone")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn an_api_server_that_fails_makes_the_endpoint_unavailable() {
        let out = run(vec![expect(Method::POST, REVIEWS, |_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "InternalError", "code": 500, "message": "etcd down"}),
            )
        })])
        .await;
        assert!(matches!(out, Err(AuthError::Unavailable(_))), "{out:?}");
    }
}
