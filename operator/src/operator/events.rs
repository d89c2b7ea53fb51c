//! Kubernetes Events on Weir's resources (`kubectl describe` shows them), the same way for
//! every kind: the note cut to the API's 1 kB limit, a failure to publish logged and otherwise
//! ignored (an Event is a courtesy; the status conditions are the record).

use super::Context;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

/// Publishes an Event of `type_` with `reason` and `note` on `obj`; repeats of the same reason
/// and note become one Event series.
pub async fn publish<K>(ctx: &Context, obj: &K, type_: EventType, reason: &str, note: &str)
where
    K: Resource<DynamicType = ()>,
{
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(
            error = %e,
            kind = %K::kind(&()),
            namespace = ?obj.namespace(),
            name = %obj.name_any(),
            "could not publish event"
        );
    }
}
