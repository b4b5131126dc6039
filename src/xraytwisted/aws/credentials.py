"""AWS credentials for signing, found like the AWS SDKs find them.

Signers ask ``current()`` and get credentials usable right now (or None);
they never wait for a lookup.  ``CredentialsService`` runs botocore's
provider chain (environment, shared files and ``AWS_PROFILE``, SSO,
``credential_process``, web identity / IRSA, the ECS/EKS container
endpoint, EC2 IMDS) in a thread, keeps the result, and looks again BEFORE
the credentials expire, so no upload waits for a refresh.  With a role ARN
(``-r``/``RoleARN``) the chain's credentials are used to assume that role
via STS in the daemon's region.

Why a fresh botocore session per lookup instead of botocore's own lazy
refresh: botocore refreshes inside the first call that needs it, blocking
that call; here every lookup happens on our schedule, in a thread, and a
new session also picks up changed files and a newly attached IAM role.

botocore reads the process environment (``os.environ``) itself; the
``env`` given to the service is only used for the daemon's own decisions
(credentials in ``env`` are used directly, and the "what was tried" text).
Its HTTP calls (STS, container endpoint, IMDS) use ``HTTP(S)_PROXY`` /
``NO_PROXY`` and ``AWS_CA_BUNDLE`` as the SDKs do, never ``-p`` or
``NoVerifySSL``, like the Go daemon.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xraytwisted.aws.botocore_private import expiry_of
from xraytwisted.aws.region import profile_name
from xraytwisted.aws.sigv4 import Credentials

if TYPE_CHECKING:
    import botocore.session

# botocore is imported only where a lookup runs (in a thread): it costs about
# 8 MB of memory, and with keys in the environment it is never needed.

__all__ = [
    "ASSUME_ROLE_SECONDS",
    "EXPIRY_MARGIN",
    "FIRST_LOAD_TIMEOUT",
    "REFRESH_LEAD",
    "SESSION_NAME",
    "CredentialsService",
    "Found",
    "NoCredentialsError",
    "StaticCredentials",
    "from_environment",
    "lookup",
    "missing_message",
    "refresh_delay",
    "retry_delay",
    "thread_runner",
]

# Look again when this much of the lifetime is left (or half of what is
# left, for shorter-lived credentials).  15 min is botocore's advisory window.
REFRESH_LEAD = 15 * 60.0
# Credentials this close to expiry are not handed out: a request signed now
# must still be valid when AWS checks it.
EXPIRY_MARGIN = 10.0
MIN_DELAY = 5.0
RETRY_BASE = 5.0
RETRY_CAP = 60.0
# Refreshable credentials whose expiry botocore does not tell us.
UNKNOWN_EXPIRY_REFRESH = 5 * 60.0
# Uploads waiting in when_loaded() go ahead (and fail, to be retried) after this.
FIRST_LOAD_TIMEOUT = 30.0
SESSION_NAME = "xray-daemon"
ASSUME_ROLE_SECONDS = 3600
# STS calls run in a thread that nothing waits for, but keep them short so a
# refresh failure is noticed and retried well before the old credentials expire.
_STS_TIMEOUTS = {
    "connect_timeout": 5,
    "read_timeout": 10,
    "retries": {"mode": "standard", "total_max_attempts": 3},
}


def new_session() -> botocore.session.Session:
    """A fresh botocore session (imports botocore on first use)."""
    import botocore.session

    return botocore.session.Session()


T = TypeVar("T")
Runner = Callable[[Callable[[], T]], "Deferred[T]"]


def from_environment(env: Mapping[str, str]) -> Credentials | None:
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, if set."""
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        return None
    return Credentials(access_key, secret_key, env.get("AWS_SESSION_TOKEN") or None)


class StaticCredentials:
    """Credentials that never change (tests, and explicitly given keys)."""

    def __init__(self, credentials: Credentials | None) -> None:
        self._credentials = credentials

    def current(self) -> Credentials | None:
        return self._credentials

    def when_loaded(self) -> Deferred[None]:
        return succeed(None)

    def status(self) -> str:
        if self._credentials is None:
            return "missing: no credentials configured"
        return "ok (static)"


# ---------------------------------------------------------------------------
# Pure parts: schedule and messages


def refresh_delay(now: float, expiry: float) -> float:
    """Seconds until the next lookup for credentials that expire at ``expiry``."""
    remaining = expiry - now
    lead = min(REFRESH_LEAD, remaining / 2)
    return max(MIN_DELAY, remaining - lead)


def retry_delay(failures: int, now: float, expiry: float | None) -> float:
    """Seconds until trying again after ``failures`` failed lookups in a row.

    Exponential from RETRY_BASE to RETRY_CAP; while the credentials held are
    still valid, at most half of their remaining time, so several attempts
    happen before they expire.
    """
    delay = min(RETRY_CAP, RETRY_BASE * 2.0 ** max(0, failures - 1))
    if expiry is not None:
        usable = expiry - EXPIRY_MARGIN - now
        if usable > 0:
            delay = min(delay, max(MIN_DELAY, usable / 2))
    return delay


def duration(seconds: float) -> str:
    """'45s', '14m', '5h59m'."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def tried_sources(env: Mapping[str, str]) -> list[str]:
    """What botocore's chain looks at, given ``env``, in its order."""
    profile = profile_name(env)
    files = ", ".join(
        (
            env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
            env.get("AWS_CONFIG_FILE") or "~/.aws/config",
        )
    )
    tried = ["environment", f"shared files for profile {profile!r} ({files})"]
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        tried.append("web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)")
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        tried.append("container endpoint")
    if _is_true(env.get("AWS_EC2_METADATA_DISABLED")):
        tried.append("EC2 instance metadata (turned off by AWS_EC2_METADATA_DISABLED)")
    else:
        tried.append("EC2 instance metadata")
    return tried


def missing_message(env: Mapping[str, str], role_arn: str = "") -> str:
    """The "no credentials anywhere" message: what was tried, what to set."""
    target = f" to assume role {role_arn} with" if role_arn else ""
    return (
        f"no credentials found{target} (tried {', '.join(tried_sources(env))}); "
        "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or attach an IAM role"
    )


_SOURCE_NAMES = {
    "env": "environment",
    "shared-credentials-file": "shared credentials file",
    "config-file": "shared config file",
    "custom-process": "credential_process",
    "assume-role": "profile role",
    "assume-role-with-web-identity": "web identity",
    "container-role": "container endpoint",
    "iam-role": "EC2 instance metadata",
}


# ---------------------------------------------------------------------------
# The blocking lookup (runs in a thread)


class NoCredentialsError(Exception):
    """No credentials could be found or made; str() says what was tried and what to do."""


@dataclass(frozen=True)
class Found:
    """Credentials and where they came from."""

    credentials: Credentials
    source: str
    # Whether looking again can give newer ones (temporary credentials).
    refreshable: bool = False


def lookup(
    session_factory: Callable[[], botocore.session.Session],
    *,
    region: str,
    role_arn: str = "",
    env: Mapping[str, str],
) -> Found:
    """Run the provider chain (and AssumeRole); BLOCKING, call it in a thread."""
    from botocore.credentials import RefreshableCredentials
    from botocore.exceptions import BotoCoreError, ClientError

    session = session_factory()
    if region:
        # Web identity and profile roles call STS: in the daemon's region.
        session.set_config_variable("region", region)
    try:
        credentials = session.get_credentials()
        frozen = None if credentials is None else credentials.get_frozen_credentials()
    except (BotoCoreError, ClientError, ValueError, OSError) as e:
        raise NoCredentialsError(f"looking up AWS credentials failed: {e}") from None
    if credentials is None or frozen is None or not frozen.access_key:
        raise NoCredentialsError(missing_message(env, role_arn))
    method = str(getattr(credentials, "method", "") or "unknown")
    found = Found(
        Credentials(
            frozen.access_key, frozen.secret_key, frozen.token or None, expiry_of(credentials)
        ),
        _SOURCE_NAMES.get(method, method),
        refreshable=isinstance(credentials, RefreshableCredentials),
    )
    if role_arn:
        return assume_role(session, found, region=region, role_arn=role_arn)
    return found


def _profile_sets_sts_endpoints(session: botocore.session.Session) -> bool:
    try:
        return "sts_regional_endpoints" in session.get_scoped_config()
    except Exception:  # no such profile: the credential lookup has said so already
        return False


def assume_role(
    session: botocore.session.Session, source: Found, *, region: str, role_arn: str
) -> Found:
    """STS AssumeRole as ``source``, session name ``xray-daemon``; BLOCKING."""
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    creds = source.credentials
    if "AWS_STS_REGIONAL_ENDPOINTS" not in os.environ and not _profile_sets_sts_endpoints(session):
        # The Go daemon calls the daemon region's STS endpoint; botocore
        # before 1.40 sends us-east-1, eu-west-1 and other old regions to the
        # global sts.amazonaws.com unless told otherwise.
        session.set_config_variable("sts_regional_endpoints", "regional")
    try:
        sts = session.create_client(
            "sts",
            region_name=region or None,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            aws_session_token=creds.token,
            config=Config(**_STS_TIMEOUTS),
        )
        answer = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=SESSION_NAME, DurationSeconds=ASSUME_ROLE_SECONDS
        )
    except ClientError as e:
        error = e.response.get("Error", {})
        raise NoCredentialsError(
            f"AssumeRole {role_arn} with credentials from {source.source} failed: "
            f"{error.get('Code', '')}: {error.get('Message', '')}; check the role ARN, that the "
            "role's trust policy allows this principal, and that it may call sts:AssumeRole"
        ) from None
    except (BotoCoreError, ValueError, OSError) as e:
        raise NoCredentialsError(f"AssumeRole {role_arn} failed: {e}") from None
    given = answer["Credentials"]
    expiration = given.get("Expiration")
    return Found(
        Credentials(
            given["AccessKeyId"],
            given["SecretAccessKey"],
            given.get("SessionToken") or None,
            expiration.timestamp() if isinstance(expiration, datetime) else None,
        ),
        f"role {role_arn} assumed with {source.source} credentials",
        refreshable=True,
    )


def thread_runner(reactor: IReactorFromThreads) -> Runner[Any]:
    """Run a blocking call in a new daemon thread; its result arrives in the reactor thread.

    Not the reactor's thread pool: the reactor joins those threads at
    shutdown, so a hung STS call or credential_process would hold up the
    daemon's exit.  Lookups are rare (about once per credential lifetime).
    """

    def run(call: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()

        def work() -> None:
            try:
                result = call()
            except BaseException:
                failure = Failure()
                reactor.callFromThread(d.errback, failure)
            else:
                reactor.callFromThread(d.callback, result)

        threading.Thread(target=work, name="xraytwisted-credentials", daemon=True).start()
        return d

    return run


# ---------------------------------------------------------------------------
# The service


class CredentialsService(Service):
    """Keeps usable credentials at hand; never blocks the reactor.

    ``current()`` is instant.  The first lookup starts in ``startService``;
    ``when_loaded()`` lets the first uploads wait for it (at most
    ``FIRST_LOAD_TIMEOUT``).  Temporary credentials are looked up again
    before they expire; failed lookups are retried with backoff while the
    old credentials stay in use, and once those expire ``current()`` is
    None (uploads then fail and are retried, never sent unsigned).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        region: str,
        role_arn: str = "",
        env: Mapping[str, str] | None = None,
        session_factory: Callable[[], botocore.session.Session] | None = None,
        fetch: Callable[[], Found] | None = None,
        run_in_thread: Runner[Any] | None = None,
        first_load_timeout: float = FIRST_LOAD_TIMEOUT,
    ) -> None:
        """``fetch`` replaces the botocore lookup (a blocking call returning Found
        or raising); ``run_in_thread`` replaces ``thread_runner(reactor)``."""
        self._reactor = reactor
        self.region = region
        self.role_arn = role_arn
        self._env: Mapping[str, str] = os.environ if env is None else env
        if fetch is None:
            fetch = self._default_fetch(session_factory or new_session)
        self._fetch: Callable[[], Found] = fetch
        self._run: Runner[Any] = run_in_thread or thread_runner(cast(IReactorFromThreads, reactor))
        self._first_load_timeout = first_load_timeout
        self._found: Found | None = None
        self._loaded = False
        self._waiters: list[Deferred[None]] = []
        self._in_flight = False
        self._failures = 0
        self._last_error = ""
        self._reported_error = ""
        self._expired_reported = False
        # Results of lookups started before a stopService are ignored.
        self._generation = 0
        self._next_lookup: IDelayedCall | None = None
        self._expiry_watch: IDelayedCall | None = None
        self._first_load_watch: IDelayedCall | None = None

    def _default_fetch(
        self, session_factory: Callable[[], botocore.session.Session]
    ) -> Callable[[], Found]:
        given = from_environment(self._env)
        # botocore handles AWS_CREDENTIAL_EXPIRATION (refreshable env credentials).
        if given is None or self._env.get("AWS_CREDENTIAL_EXPIRATION"):
            return functools.partial(
                lookup,
                session_factory,
                region=self.region,
                role_arn=self.role_arn,
                env=self._env,
            )
        # Keys in env come first in the SDK chain too; used as given (botocore
        # would read os.environ, which need not be ``env``).
        found = Found(given, "environment")
        if not self.role_arn:
            return lambda: found
        return lambda: assume_role(
            session_factory(), found, region=self.region, role_arn=self.role_arn
        )

    # -- what signers use ---------------------------------------------------

    def current(self) -> Credentials | None:
        found = self._found
        if found is None:
            return None
        expiry = found.credentials.expiry
        if expiry is not None and self._reactor.seconds() >= expiry - EXPIRY_MARGIN:
            return None
        return found.credentials

    def when_loaded(self) -> Deferred[None]:
        """Fires once the first lookup has finished (or FIRST_LOAD_TIMEOUT passed)."""
        if self._loaded:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def status(self) -> str:
        """One line for /health and logs."""
        found = self._found
        now = self._reactor.seconds()
        if found is not None:
            expiry = found.credentials.expiry
            if expiry is None:
                text = f"ok ({found.source})"
            elif now < expiry - EXPIRY_MARGIN:
                text = f"ok ({found.source}, expires in {duration(expiry - now)})"
            else:
                why = self._last_error or "the refresh has not finished yet"
                return (
                    f"expired: credentials from {found.source} expired "
                    f"{duration(now - expiry)} ago and could not be refreshed: {why}"
                )
            if self._last_error:
                text += f"; refresh failing: {self._last_error}"
            return text
        if self._last_error:
            return f"missing: {self._last_error}"
        return "loading: looking for AWS credentials"

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not self._loaded:
            self._first_load_watch = self._reactor.callLater(
                self._first_load_timeout, self._first_load_late
            )
        if getattr(self._reactor, "running", True):
            self._lookup()
        else:
            # Started before reactor.run(): look on its first turn.  The
            # daemon holds SIGTERM and SIGINT until its handlers are back
            # "during startup"; a thread started before that keeps the mask,
            # and so would a credential_process child it runs (which could
            # then not be stopped).
            self._next_lookup = self._reactor.callLater(0, self._lookup)

    def stopService(self) -> None:
        super().stopService()
        self._generation += 1
        self._in_flight = False
        for call in (self._next_lookup, self._expiry_watch, self._first_load_watch):
            if call is not None and call.active():
                call.cancel()
        self._next_lookup = self._expiry_watch = self._first_load_watch = None
        # Nobody may wait for a service that no longer looks.
        self._set_loaded()

    # -- lookups ----------------------------------------------------------------

    def _lookup(self) -> None:
        self._next_lookup = None
        if self._in_flight or not self.running:
            return
        self._in_flight = True
        generation = self._generation
        d: Deferred[Found] = self._run(self._fetch)
        d.addCallbacks(
            self._found_credentials,
            self._lookup_failed,
            callbackArgs=(generation,),
            errbackArgs=(generation,),
        )

    def _found_credentials(self, found: Found, generation: int) -> None:
        if generation != self._generation:
            return
        self._in_flight = False
        now = self._reactor.seconds()
        expiry = found.credentials.expiry
        had_usable = self.current() is not None
        self._found = found
        recovered = self._failures > 0
        self._failures = 0
        self._last_error = self._reported_error = ""
        self._expired_reported = False
        left = "" if expiry is None else f", valid for {duration(expiry - now)}"
        if not had_usable or recovered:
            self.log.info(
                "Using AWS credentials from {source}{left}", source=found.source, left=left
            )
        else:
            self.log.debug(
                "Refreshed AWS credentials from {source}{left}", source=found.source, left=left
            )
        if expiry is not None:
            self._schedule(refresh_delay(now, expiry))
            self._watch_expiry(expiry - EXPIRY_MARGIN - now)
        else:
            if self._expiry_watch is not None and self._expiry_watch.active():
                self._expiry_watch.cancel()
            self._expiry_watch = None
            if found.refreshable:
                self._schedule(UNKNOWN_EXPIRY_REFRESH)
        self._set_loaded()

    def _lookup_failed(self, failure: Failure, generation: int) -> None:
        if generation != self._generation:
            return
        self._in_flight = False
        self._failures += 1
        error = failure.getErrorMessage()
        if not isinstance(failure.value, NoCredentialsError):
            error = f"looking up AWS credentials failed: {type(failure.value).__name__}: {error}"
        self._last_error = error
        now = self._reactor.seconds()
        held = self.current()
        expiry = held.expiry if held is not None else None
        delay = retry_delay(self._failures, now, expiry)
        if error == self._reported_error:
            # Each distinct problem is reported once; retries repeat it.
            self.log.debug(
                "Looking up AWS credentials failed again: {error}; trying again in {delay:.0f} s",
                error=error,
                delay=delay,
            )
        elif held is not None and self._found is not None:
            self.log.warn(
                "Refreshing AWS credentials from {source} failed: {error}; still using the "
                "current ones, which expire in {left}; trying again in {delay:.0f} s",
                source=self._found.source,
                error=error,
                left=duration((expiry or now) - now),
                delay=delay,
            )
        else:
            self.log.error(
                "Cannot get AWS credentials: {error}; uploads fail until credentials are "
                "found (trying again in {delay:.0f} s)",
                error=error,
                delay=delay,
            )
        self._reported_error = error
        self._schedule(delay)
        self._set_loaded()

    def _schedule(self, delay: float) -> None:
        if self._next_lookup is not None and self._next_lookup.active():
            self._next_lookup.cancel()
        self._next_lookup = self._reactor.callLater(delay, self._lookup)

    def _watch_expiry(self, delay: float) -> None:
        if self._expiry_watch is not None and self._expiry_watch.active():
            self._expiry_watch.cancel()
        self._expiry_watch = self._reactor.callLater(max(0.0, delay), self._expired)

    def _expired(self) -> None:
        self._expiry_watch = None
        found = self._found
        if found is None or self.current() is not None or self._expired_reported:
            return
        self._expired_reported = True
        self._reported_error = self._last_error
        self.log.error(
            "AWS credentials from {source} have expired and could not be refreshed: {error}; "
            "uploads fail until new credentials are found",
            source=found.source,
            error=self._last_error or "the refresh has not finished yet",
        )

    # -- first load -------------------------------------------------------------

    def _first_load_late(self) -> None:
        self._first_load_watch = None
        if not self._loaded:
            self.log.warn(
                "Still looking for AWS credentials after {seconds:g} s; uploads go ahead and "
                "fail until they are found",
                seconds=self._first_load_timeout,
            )
            self._set_loaded()

    def _set_loaded(self) -> None:
        if self._first_load_watch is not None and self._first_load_watch.active():
            self._first_load_watch.cancel()
        self._first_load_watch = None
        if self._loaded:
            return
        self._loaded = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
