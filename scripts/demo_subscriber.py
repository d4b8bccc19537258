"""Demo helper: print what the agent published to the local broker (alerts, health, status)."""

from __future__ import annotations

import json
import sys

import paho.mqtt.client as mqtt


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgewatch-demo-subscriber")

    def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        c.subscribe("edgewatch/#", qos=1)

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload[:80]
        if isinstance(body, dict) and body.get("type") == "alert":
            top = ", ".join(f"{s['channel']} {s['share']:.0%}" for s in body.get("top_sensors", []))
            print(
                f"[broker] {msg.topic}: {body['state'].upper()} {body['alert_id']} "
                f"score {body['score']:.3g} > {body['threshold']:.3g} ({top})",
                flush=True,
            )
        else:
            print(f"[broker] {msg.topic}: {json.dumps(body)[:160]}", flush=True)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port)
    client.loop_forever()


if __name__ == "__main__":
    main()
