"""Test environments for tests/test_episodes.py (written as a user would, from the README's description)."""

import os
import time

from rayrlhf.rewards.tasks import sort_score


class Chatty:
    """Three turns: a tool reply, then a user reply, then done; each turn earns the share of letters a-p
    (async methods, as an environment calling a service would have)."""

    async def reset(self, row):
        self.turn = 0
        return [{"role": "system", "content": "be brief"}] if row.get("system") else None

    async def step(self, action):
        self.turn += 1
        reward = sum("a" <= ch <= "p" for ch in action) / len(action) if action else 0.0
        if self.turn == 1:
            return [{"role": "tool", "name": "probe", "content": f"seen {len(action)} chars"}], reward, False
        if self.turn == 2:
            return "again, shorter", reward, False
        return None, reward, True


class OneTurn:
    """A single turn scored like the sort task's reward function: a 1-turn episode is a single-turn sample."""

    def reset(self, row):
        self.answer = row["answer"]

    def step(self, action):
        return None, sort_score(action, self.answer), True


class Fragile:
    """Two turns; some rows make it raise, hang or kill its process (the episode fails, the job goes on)."""

    def reset(self, row):
        self.mode = {0: "raise", 1: "hang", 2: "exit"}.get(len(row["prompt"]) % 7, "fine")
        self.turn = 0

    def step(self, action):
        self.turn += 1
        if self.turn == 2 and self.mode == "raise":
            raise RuntimeError("the environment broke")
        if self.turn == 2 and self.mode == "hang":
            time.sleep(30)
        if self.turn == 2 and self.mode == "exit":
            os._exit(3)
        return "go on", sum("a" <= ch <= "p" for ch in action) / max(len(action), 1), self.turn >= 2

    def close(self):
        pass
