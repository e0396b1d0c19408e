"""The legacy caller, written as the production Python clients are
(docs/LEGACY.md, contract 1): a server-named exclusive callback queue consumed
with auto-ack, a new UUID4 string as the correlation id of each call, the
request as msgpack on the default exchange with reply_to and correlation_id
(no content type), and a wait for the reply whose correlation id matches,
ignoring others, up to a timeout.

Usage: legacy_client.py QUEUE JSON

The broker's URL comes from AMQP_ADDR (default the local RabbitMQ), the
timeout in seconds from RPC_TIMEOUT_SECS (default 180, the legacy default).
JSON is the request ("-" reads it from standard input, for requests larger
than a command line may be); an object {"$bytes": "<hex>"} in it stands for
binary data (msgpack bin, Python bytes). Prints the reply as one line of JSON,
binary data written back the same way, and exits 0; exits 2 when no reply
came in time. The reply's properties that are set go to standard error as
one line, "reply properties: {...}", for those who check the protocol.
"""
import json
import os
import sys
import time
import uuid

import msgpack
import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def from_json(value):
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$bytes"), str):
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def to_json(value):
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, dict):
        # JSON keys are strings; a non-string msgpack key is written as its JSON text.
        return {
            k if isinstance(k, str) else json.dumps(to_json(k)): to_json(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


class RpcClient:
    def __init__(self, url):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.corr_id = None
        self.response = None
        self.properties = None

    def on_response(self, ch, method, props, body):
        if props.correlation_id == self.corr_id:
            self.response = body
            self.properties = props

    def call(self, queue, args, timeout):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=queue,
            properties=pika.BasicProperties(reply_to=self.callback_queue, correlation_id=self.corr_id),
            body=msgpack.packb(args),
        )
        deadline = time.monotonic() + timeout
        while self.response is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.connection.process_data_events(time_limit=min(left, 0.5))
        return msgpack.unpackb(self.response, raw=False)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: legacy_client.py QUEUE JSON")
    queue = sys.argv[1]
    text = sys.stdin.read() if sys.argv[2] == "-" else sys.argv[2]
    request = from_json(json.loads(text))
    url = os.environ.get("AMQP_ADDR") or os.environ.get("AMQP_URL") or DEFAULT_URL
    timeout = float(os.environ.get("RPC_TIMEOUT_SECS", "180"))

    client = RpcClient(url)
    reply = client.call(queue, request, timeout)
    client.connection.close()
    if reply is None:
        print("no reply from %s within %g s" % (queue, timeout), file=sys.stderr)
        sys.exit(2)
    props = client.properties
    names = ("content_type", "content_encoding", "headers", "delivery_mode", "priority",
             "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
             "user_id", "app_id", "cluster_id")
    shown = {n: getattr(props, n) for n in names if getattr(props, n) is not None}
    print("reply properties: " + json.dumps(to_json(shown), default=str), file=sys.stderr)
    print(json.dumps(to_json(reply)), flush=True)


if __name__ == "__main__":
    main()
