"""
Sets of ids that guard against handling an id twice stay bounded however long a session lives
(SPEC §7), and still catch the duplicates that matter: the recent ones.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import session as s
from openai_proxy.function_calls import RECENT_CALL_IDS
from openai_proxy.recent import RecentIds
from openai_proxy.tests.test_session import Harness


class RecentIdsTests(SynchronousTestCase):
    def test_keeps_the_newest_and_forgets_the_oldest(self) -> None:
        ids = RecentIds(3)
        for name in "abcd":
            ids.add(name)
        self.assertEqual([name in ids for name in "abcd"], [False, True, True, True])
        self.assertEqual(len(ids), 3)

    def test_adding_again_makes_an_id_newest(self) -> None:
        ids = RecentIds(2)
        ids.add("a")
        ids.add("b")
        ids.add("a")
        ids.add("c")
        self.assertIn("a", ids)
        self.assertNotIn("b", ids)

    def test_a_limit_below_one_is_refused(self) -> None:
        self.assertRaises(ValueError, RecentIds, 0)


def _texts(out: list[s.Output]) -> list[dict[str, Any]]:
    return [m for m in Harness.client(out) if m["type"] == "ConversationText"]


class LongSessionTests(SynchronousTestCase):
    """A thousand replies and calls: each handled once, the guards no larger than their limits."""

    def test_assistant_texts_over_a_long_session(self) -> None:
        h = Harness()
        h.configure()
        for n in range(3 * s.RECENT_IDS):
            response_id, item_id = f"resp_{n}", f"item_{n}"
            h.start_response(response_id)
            item = {"id": item_id, "type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": f"reply {n}"}]}
            out = h.up("response.output_text.done", response_id=response_id, item_id=item_id,
                       output_index=0, content_index=0, text=f"reply {n}")
            out += h.up("response.output_item.done", response_id=response_id, output_index=0, item=item)
            out += h.up("response.done", response={"id": response_id, "status": "completed",
                                                   "output": [item]})
            self.assertEqual(_texts(out), [{"type": "ConversationText", "role": "assistant",
                                            "content": f"reply {n}"}])
        self.assertLessEqual(len(h.session._texted_items), s.RECENT_IDS)
        # A late duplicate of the newest reply's done event sends nothing.
        out = h.up("response.output_text.done", response_id=response_id, item_id=item_id,
                   output_index=0, content_index=0, text=f"reply {n}")
        self.assertEqual(_texts(out), [])

    def test_function_calls_over_a_long_session(self) -> None:
        h = Harness()
        h.configure()
        for n in range(3 * RECENT_CALL_IDS):
            response_id, call_id = f"resp_{n}", f"call_{n}"
            h.start_response(response_id)
            call = {"id": f"fc_{n}", "type": "function_call", "call_id": call_id, "name": "get_weather",
                    "arguments": "{}", "status": "completed"}
            h.up("response.function_call_arguments.done", response_id=response_id, item_id=f"fc_{n}",
                 output_index=0, call_id=call_id, name="get_weather", arguments="{}")
            out = h.up("response.output_item.done", response_id=response_id, output_index=0, item=call)
            self.assertEqual(h.client_types(out), ["FunctionCallRequest"])
            h.up("response.done", response={"id": response_id, "status": "completed", "output": [call]})
            out = h.text({"type": "FunctionCallResponse", "id": call_id, "name": "get_weather",
                          "content": "sunny"})
            [created] = h.upstream(out)
            h.confirm_item(created["item"]["id"], role="tool")
            h.up("response.created", response={"id": f"resp_{n}_after", "status": "in_progress"})
            h.up("response.done", response={"id": f"resp_{n}_after", "status": "completed", "output": []})
        calls = h.session._calls
        self.assertLessEqual(len(calls._requested), RECENT_CALL_IDS)
        self.assertEqual(calls.rounds, {})
        # A late duplicate of the newest call's done event requests nothing.
        out = h.up("response.output_item.done", response_id=response_id, output_index=0, item=call)
        self.assertEqual(h.client_types(out), [])
