"""Routing a request to its attempt plan: the upstreams that may answer it, in order (keys
are chosen attempt by attempt, by their health: `gateway.upstream.attempts`). A request about a
stored response goes where the response was made, and only for the team that made it."""

from __future__ import annotations

from gateway import errors
from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.ledger.records import ReportReader
from gateway.owners import OwnerStore
from gateway.policy import Policy
from gateway.routes import Route
from gateway.upstream.client import UpstreamClient


def by_model(policy: Policy, principal: Principal, model: str) -> tuple[UpstreamClient, ...]:
    team = principal.team.name
    if not policy.team_models[team](model):
        raise errors.model_not_allowed(policy.redactor(model), team)
    names = policy.router.route(model)
    if not names:
        raise errors.model_not_found(policy.redactor(model))
    if len(names) == 1:  # the usual case, without a generator
        return (policy.upstreams[names[0]],)
    return tuple(policy.upstreams[name] for name in names)


async def by_owner(
    policy: Policy, principal: Principal, owners: OwnerStore, ledger: ReportReader, path: str
) -> tuple[UpstreamClient, ...]:
    owner = await owned(policy, principal, owners, ledger, path.split("/")[3])
    client = policy.upstreams.get(owner[1]) or policy.default_upstream
    return (client,)


async def owned(
    policy: Policy, principal: Principal, owners: OwnerStore, ledger: ReportReader, rid: str
) -> tuple[str, str]:
    """The (team, upstream) of a stored response of the principal's team, else a 404."""
    owner = await owners.get(rid)
    if owner is None:
        owner = await ledger.owner(rid)
        if owner is not None:
            owners.remember(rid, owner)
    if owner is None or owner[0] != principal.team.name:
        # every response made through the gateway is in the ledger with its team: one that
        # is not, or is another team's, does not exist for this team
        raise GatewayError(
            404,
            "invalid_request_error",
            "not_found",
            f"No response found with id {errors.quoted(policy.redactor(rid))}.",
        )
    return owner


async def plan(
    policy: Policy,
    route: Route,
    principal: Principal,
    model: str,
    owners: OwnerStore,
    ledger: ReportReader,
    path: str,
    previous: object = None,
) -> tuple[UpstreamClient, ...]:
    """`previous`: the body's `previous_response_id`. A response continued from another is
    read by the upstream with that one's whole conversation: only its own team may name it,
    and it is sent where that response is kept (when the model's route goes there)."""
    if route.owned:
        return await by_owner(policy, principal, owners, ledger, path)
    if route.refused:
        raise errors.not_found()
    if not model:
        return (policy.default_upstream,)
    candidates = by_model(policy, principal, model)
    if previous is None or not route.model:
        return candidates
    if not isinstance(previous, str) or not previous:
        raise errors.invalid_value(
            "previous_response_id", "previous_response_id must be a response id (a string)."
        )
    upstream = (await owned(policy, principal, owners, ledger, previous))[1]
    kept = tuple(c for c in candidates if c.name == upstream)
    return kept or candidates
