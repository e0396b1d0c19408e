"""The legacy demo worker, written as the production Python services are
(docs/LEGACY.md, contract 1): pika BlockingConnection and msgpack, the request
queue declared with default arguments, prefetch 1, manual acks, the reply
published on the default exchange to reply_to with only the correlation id.

Usage: legacy_server.py QUEUE [COUNT]

The broker's URL comes from AMQP_ADDR (default the local RabbitMQ). Prints
"ready" once it consumes, then one JSON line per request served (what the
request's properties were), so that a test waits on events, not on time.
Serves until killed, or until it has served COUNT requests.

The demo service answers {"msg": "hello from service"}, plus the request's
"echo" value under "echo" when the request is a map that has one. For the
tests it also returns the whole request under "request", so the caller can
check that nested values, binary data and unicode came through intact.
"""
import json
import os
import sys

import msgpack
import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def service(request):
    reply = {"msg": "hello from service"}
    if isinstance(request, dict) and "echo" in request:
        reply["echo"] = request["echo"]
    reply["request"] = request
    return reply


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: legacy_server.py QUEUE [COUNT]")
    queue = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) == 3 else None
    url = os.environ.get("AMQP_ADDR") or os.environ.get("AMQP_URL") or DEFAULT_URL

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue)
    channel.basic_qos(prefetch_count=1)
    served = 0

    def on_request(ch, method, props, body):
        nonlocal served
        request = msgpack.unpackb(body, raw=False)
        if props.reply_to:
            ch.basic_publish(
                exchange="",
                routing_key=props.reply_to,
                properties=pika.BasicProperties(correlation_id=props.correlation_id),
                body=msgpack.packb(service(request)),
            )
        ch.basic_ack(delivery_tag=method.delivery_tag)
        served += 1
        seen = {
            "served": served,
            "correlation_id": props.correlation_id,
            "reply_to": props.reply_to,
            "content_type": props.content_type,
            "redelivered": method.redelivered,
        }
        print(json.dumps(seen), flush=True)
        if count is not None and served >= count:
            ch.stop_consuming()

    # basic_consume waits for the broker's consume-ok: once "ready" is out,
    # requests on the queue reach this worker.
    channel.basic_consume(queue=queue, on_message_callback=on_request)
    print("ready", flush=True)
    channel.start_consuming()
    connection.close()


if __name__ == "__main__":
    main()
