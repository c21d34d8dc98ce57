"""Native tests of the quiz rules: `python3 -m unittest` in this folder."""

import unittest

import quiz


def fresh() -> quiz.Quiz:
    return quiz.Quiz(quiz.MemoryStore())


class Normalise(unittest.TestCase):
    def test_articles_and_punctuation(self) -> None:
        self.assertEqual(quiz.normalise("The Pacific!"), "pacific")
        self.assertEqual(quiz.normalise("  it's PARIS. "), "paris")
        self.assertEqual(quiz.normalise("forty-two"), "forty-two")
        self.assertEqual(quiz.normalise("?!"), "")

    def test_strict_and_loose_answers(self) -> None:
        paris = 0
        self.assertTrue(quiz.is_correct(paris, "Paris", loose=False))
        self.assertFalse(quiz.is_correct(paris, "I think Paris", loose=False))
        self.assertTrue(quiz.is_correct(paris, "I think Paris", loose=True))
        self.assertFalse(quiz.is_correct(paris, "Parisian", loose=True))
        self.assertFalse(quiz.is_correct(paris, "", loose=True))


class Mentions(unittest.TestCase):
    def test_forms(self) -> None:
        m = quiz.mention_rest
        self.assertEqual(m("@quizmaster quiz", "quizmaster"), "quiz")
        self.assertEqual(m("QuizMaster: paris", "quizmaster"), "paris")
        self.assertEqual(m("hey @quizmaster, paris", "quizmaster"), "hey paris")
        self.assertEqual(m("@quizmaster", "quizmaster"), "")
        self.assertIsNone(m("quizmasters unite", "quizmaster"))
        self.assertIsNone(m("@quizmaster-2 hi", "quizmaster"))
        self.assertIsNone(m("mail@quizmaster hi", "quizmaster"))

    def test_commands(self) -> None:
        self.assertEqual(quiz.command_of("quiz"), "ask")
        self.assertEqual(quiz.command_of("Quiz me!"), "ask")
        self.assertEqual(quiz.command_of("scores"), "scores")
        self.assertEqual(quiz.command_of(""), "help")
        self.assertIsNone(quiz.command_of("paris"))


class Rounds(unittest.TestCase):
    def test_a_round_and_the_scores(self) -> None:
        q = fresh()
        line = q.ask("lobby", "quizmaster")
        self.assertTrue(line.startswith("❓ Question 1/"), line)
        self.assertEqual(quiz.parse_question_line(line), 0)
        self.assertTrue(q.ask("lobby", "quizmaster").startswith("Still open: ❓ Question 1/"))
        # Wrong and unmentioned: silent. Wrong and mentioned: counted.
        self.assertIsNone(q.answer("lobby", "bob", "lyon", mentioned=False))
        self.assertEqual(
            q.answer("lobby", "bob", "lyon", mentioned=True),
            "Not quite, bob. (1 try so far)",
        )
        self.assertEqual(
            q.answer("lobby", "ada", "paris", mentioned=False),
            "✅ ada got it: paris! ada has 1 point.",
        )
        self.assertIsNone(q.answer("lobby", "bob", "paris", mentioned=True), "closed")
        self.assertEqual(q.scores(), "🏆 Scores: ada 1")
        self.assertEqual(
            q.recap_from_memory("lobby"),
            "Last question: What is the capital of France? Answers: bob: lyon; ada: paris. ada won.",
        )
        # Next question, another room, a skip.
        self.assertTrue(q.ask("dev", "quizmaster").startswith("❓ Question 2/"))
        self.assertEqual(q.skip("dev"), "The answer was: 8.")
        self.assertIn("Nobody got it: 8.", q.recap_from_memory("dev"))
        self.assertEqual(q.skip("dev"), "No question is open. Mention me with `quiz` for one.")

    def test_scores_sort_and_survive_bad_values(self) -> None:
        store = quiz.MemoryStore()
        store.set("score/ada", "2")
        store.set("score/bob", "5")
        store.set("score/cy", "garbage")
        self.assertEqual(quiz.Quiz(store).scores(), "🏆 Scores: bob 5, ada 2, cy 0")
        self.assertEqual(fresh().scores(), "No scores yet. Mention me with `quiz` to play.")

    def test_questions_rotate(self) -> None:
        q = fresh()
        seen = []
        for _ in range(len(quiz.QUESTIONS) + 1):
            line = q.ask("lobby", "qm")
            seen.append(quiz.parse_question_line(line))
            q.skip("lobby")
        self.assertEqual(seen[: len(quiz.QUESTIONS)], list(range(len(quiz.QUESTIONS))))
        self.assertEqual(seen[-1], 0)

    def test_every_question_accepts_its_first_answer(self) -> None:
        for i, (_, answers) in enumerate(quiz.QUESTIONS):
            self.assertTrue(quiz.is_correct(i, answers[0], loose=False), answers[0])


class Recap(unittest.TestCase):
    def test_from_history(self) -> None:
        me = "quizmaster"
        ask = quiz.question_line(2, me)
        messages = [
            ("ada", "@quizmaster quiz", False),
            (me, ask, True),
            ("bob", "@quizmaster venus", False),
            ("cy", "unrelated chatter", False),
            ("ada", "@quizmaster scores", False),
            ("ada", "@quizmaster mars", False),
            (me, "✅ ada got it: mars! ada has 1 point.", True),
        ]
        self.assertEqual(
            quiz.recap_from_history(messages, me),
            "Last question: Which planet is known as the Red Planet? "
            "Answers: bob: venus; ada: mars. ada won.",
        )
        self.assertIsNone(quiz.recap_from_history(messages[:1], me))
        open_round = quiz.recap_from_history(messages[:3], me)
        self.assertEqual(
            open_round,
            "Last question: Which planet is known as the Red Planet? "
            "Answers: bob: venus. Still open.",
        )


if __name__ == "__main__":
    unittest.main()
