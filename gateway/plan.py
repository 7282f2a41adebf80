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
    rid = path.split("/")[3]
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
    client = policy.upstreams.get(owner[1]) or policy.default_upstream
    return (client,)


async def plan(
    policy: Policy,
    route: Route,
    principal: Principal,
    model: str,
    owners: OwnerStore,
    ledger: ReportReader,
    path: str,
) -> tuple[UpstreamClient, ...]:
    if route.owned:
        return await by_owner(policy, principal, owners, ledger, path)
    if route.refused:
        raise errors.not_found()
    if model:
        return by_model(policy, principal, model)
    return (policy.default_upstream,)
