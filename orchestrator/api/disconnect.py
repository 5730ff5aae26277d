"""Work for a client that has gone stops: `DisconnectMiddleware` cancels a request's handling when its client
disconnects before the response is complete.

Without it, a client that gives up on a non-streamed request (the `openai` SDK's timeout, then its two retries)
leaves its pipeline running: its stage calls go on, the in-process model keeps generating, and the next user waits
behind abandoned work. Starlette already stops a streamed response when its client goes; this covers the rest.

Once the request's body has been read, the middleware listens for `http.disconnect`. When it comes before the
response's last body message, the handling is cancelled: stage calls are cancelled (a remote server's connection is
closed, which makes vLLM and SGLang abort the generation), an in-process generation stops within one decoding step,
and work still queued in admission control or behind the model's lock never starts. The request's record gets status
499 (nginx's "client closed request"), a streamed one's too (its 200 had gone out, its end had not), and is audited
like any other. A disconnect after the response is complete
(every server reports one) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.observability.record import RequestRecord

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499


class DisconnectMiddleware:
    """Cancels the handling of a request whose client disconnects before its response is complete."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        answered = False

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def send_answer(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        handling = asyncio.current_task()
        assert handling is not None
        gone = False

        async def listen() -> None:
            nonlocal gone
            await _disconnected(receive, body_read)
            if not answered:  # else the disconnect every server reports once the response is complete
                gone = True
                handling.cancel()

        listening = asyncio.create_task(listen())
        try:
            await self.app(scope, receive_body, send_answer)
        except asyncio.CancelledError:
            if not gone or handling.uncancel() > 0:  # not ours alone: the server's, or the loop's, goes on
                raise
            _note_gone(scope)
            return
        except Exception as exc:
            if not gone:
                raise
            handling.uncancel()  # the handler turned our cancellation into another error
            log.info("a cancelled request ended with %s: %s", type(exc).__name__, exc)  # nobody left to answer
            _note_gone(scope)
            return
        finally:
            listening.cancel()
        if gone:  # cancelled as the handler returned: its answer had been sent but not completed
            handling.uncancel()
            _note_gone(scope)
        elif not answered:  # a streamed response Starlette stopped because its client went away
            _note_gone(scope)


async def _disconnected(receive: Receive, body_read: asyncio.Event) -> None:
    """Returns when the client disconnects, listening only once the handler has read the whole body."""
    await body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


def _note_gone(scope: Scope) -> None:
    record = RequestRecord.of(scope)
    record.status = CLIENT_CLOSED  # a streamed response's 200 had gone out, but the response was never complete
    record.error = "client_disconnected"
    log.info("the client disconnected before its response was complete; its request was cancelled")
