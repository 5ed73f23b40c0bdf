"""Data as people download it: Anthropic HH-RLHF transcripts, Intel/orca_dpo_pairs' `question` rows,
HuggingFaceH4/ultrafeedback_binarized conversations, and any file whose columns a mapping renames."""

import csv
import json

import pytest

from orpo_local.data import DataFileError, inspect_data, load_pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- HH-RLHF

SLEEP = "\n\nHuman: How do I get my toddler to sleep through the night?\n\nAssistant:"
SLEEP_GOOD = ("A steady bedtime routine helps most: bath, story, lights out at the same time every night.\n\n"
              "If she wakes, keep the visit short and boring, so waking up is not rewarding.")
NOVEL = ("\n\nHuman: Can you recommend a sci-fi novel?"
         "\n\nAssistant: Have you read The Left Hand of Darkness by Ursula K. Le Guin?"
         "\n\nHuman: No. What is it about?\n\nAssistant:")
HH_ROWS = [
    {"chosen": f"{SLEEP} {SLEEP_GOOD}", "rejected": f"{SLEEP} Just let her stay up until she is tired."},
    {"chosen": f"{NOVEL} An envoy visits a planet whose people have no fixed sex, and learns to trust one of them.",
     "rejected": f"{NOVEL} It's a book."},
    # a transcript that starts without the leading blank line, as some re-exports of the data do
    {"chosen": "Human: What is the capital of Australia?\n\nAssistant: Canberra.",
     "rejected": "Human: What is the capital of Australia?\n\nAssistant: Sydney."},
]


def test_hh_rlhf_single_and_multi_turn_transcripts(tmp_path):
    report = inspect_data(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS))
    assert report.format == "hh-rlhf" and not report.invalid and report.columns == {}
    sleep, novel, capital = report.pairs
    assert sleep.prompt == [user("How do I get my toddler to sleep through the night?")]
    assert sleep.chosen == SLEEP_GOOD  # the blank line inside the turn stays
    assert sleep.rejected == "Just let her stay up until she is tired."
    assert sleep.system is None and sleep.meta == {}
    assert novel.prompt == [user("Can you recommend a sci-fi novel?"),
                            assistant("Have you read The Left Hand of Darkness by Ursula K. Le Guin?"),
                            user("No. What is it about?")]
    assert (novel.chosen, novel.rejected) == (
        "An envoy visits a planet whose people have no fixed sex, and learns to trust one of them.", "It's a book.")
    assert capital.prompt == [user("What is the capital of Australia?")]
    assert (capital.chosen, capital.rejected) == ("Canberra.", "Sydney.")
    assert [p.row for p in report.pairs] == [1, 2, 3]


def test_hh_rlhf_broken_transcripts_are_reported_row_by_row(tmp_path):
    rows = HH_ROWS[:1] + [
        {"chosen": f"{NOVEL} An envoy visits a cold planet.",  # 2: the histories differ
         "rejected": NOVEL.replace("No. What is it about?", "Who wrote it again?") + " Le Guin."},
        {"chosen": "\n\nHuman: Hi there", "rejected": "\n\nHuman: Hi there"},  # 3: no assistant turn
        {"chosen": f"{SLEEP} Try a routine.\n\nHuman: And if that fails?",  # 4: ends with a Human turn
         "rejected": f"{SLEEP} Let her stay up."},
        {"chosen": SLEEP, "rejected": f"{SLEEP} Let her stay up."},  # 5: empty last response
        {"chosen": f"{SLEEP} Read to her.", "rejected": f"{SLEEP} Read to her."},  # 6: chosen == rejected
        {"chosen": f"{SLEEP} Read to her.", "rejected": 42},  # 7: not a transcript at all
    ]
    report = inspect_data(write_jsonl(tmp_path / "hh_bad.jsonl", rows))
    assert report.format == "hh-rlhf" and [p.row for p in report.pairs] == [1]
    assert {r.row: r.reason for r in report.invalid} == {
        2: "chosen and rejected transcripts differ before their last Assistant turn "
           "(turn 3 is Human 'No. What is it about?' in chosen but Human 'Who wrote it again?' in rejected)",
        3: "chosen transcript has no 'Assistant:' turn, so it holds no response; "
           "rejected transcript has no 'Assistant:' turn, so it holds no response",
        4: "chosen transcript ends with a 'Human:' turn, so it holds no response to its last question",
        5: "empty response: 'chosen' is blank",
        6: "chosen == rejected: the pair teaches nothing",
        7: "field 'rejected' must be a string, got int",
    }


def test_hh_rlhf_named_explicitly_refuses_plain_text(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"chosen": "Canberra.", "rejected": "Sydney."}])
    (bad,) = inspect_data(path, format="hh-rlhf").invalid
    assert bad.reason == ("chosen transcript has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns: 'Canberra.'; "
                          "rejected transcript has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns: 'Sydney.'")


# ---------------------------------------------------------------- question / query as the prompt

ORCA_SYSTEM = "You are an AI assistant. You will be given a task. You must generate a detailed and long answer."
ORCA_ROWS = [
    {"system": "", "question": "Translate to German: The train leaves at noon.",
     "chosen": "Der Zug fährt mittags ab.", "rejected": "Der Zug kommt am Abend."},
    {"system": ORCA_SYSTEM, "question": "Is 91 a prime number?",
     "chosen": "No. 91 = 7 × 13, so it has divisors other than 1 and itself.", "rejected": "Yes, 91 is prime."},
]


def test_orca_question_rows_are_standard_pairs_without_a_mapping(tmp_path):
    report = inspect_data(write_jsonl(tmp_path / "orca.jsonl", ORCA_ROWS))
    assert report.format == "standard" and not report.invalid
    assert report.columns == {"prompt": "question"}
    german, prime = report.pairs
    assert german.prompt == [user("Translate to German: The train leaves at noon.")] and german.system is None
    assert (german.chosen, german.rejected) == ("Der Zug fährt mittags ab.", "Der Zug kommt am Abend.")
    assert prime.system == ORCA_SYSTEM and prime.prompt == [user("Is 91 a prime number?")]
    assert german.meta == {} and prime.meta == {}  # `question` is the prompt, not also metadata

    query = [{"query": "Name a prime above 10.", "chosen": "11", "rejected": "12", "source": "gsm"}]
    (pair,) = load_pairs(write_jsonl(tmp_path / "query.jsonl", query))
    assert pair.prompt == [user("Name a prime above 10.")] and pair.meta == {"source": "gsm"}


def test_a_question_column_beside_a_prompt_stays_metadata(tmp_path):
    row = {"prompt": "2+2?", "question": "arithmetic", "chosen": "4", "rejected": "5"}
    report = inspect_data(write_jsonl(tmp_path / "both.jsonl", [row]))
    assert report.columns == {} and report.pairs[0].prompt == [user("2+2?")]
    assert report.pairs[0].meta == {"question": "arithmetic"}


# ---------------------------------------------------------------- column mapping

GERMAN = {"prompt": "frage", "chosen": "gut", "rejected": "schlecht", "system": "anweisung"}
GERMAN_ROWS = [
    {"id": 7, "anweisung": "Antworte kurz.", "frage": "Wie hoch ist die Zugspitze?", "gut": "2962 Meter.", "schlecht": "Etwa 500 Meter."},
    {"id": 8, "anweisung": "", "frage": "Hauptstadt von Österreich?", "gut": "Wien.", "schlecht": "Salzburg."},
]


def assert_german_pairs(pairs, ids):
    tall, capital = pairs
    assert tall.prompt == [user("Wie hoch ist die Zugspitze?")] and tall.system == "Antworte kurz."
    assert (tall.chosen, tall.rejected) == ("2962 Meter.", "Etwa 500 Meter.")
    assert capital.prompt == [user("Hauptstadt von Österreich?")] and capital.system is None
    assert (capital.chosen, capital.rejected) == ("Wien.", "Salzburg.")
    assert [p.meta for p in pairs] == [{"id": ids[0]}, {"id": ids[1]}]  # renamed columns leave no trace


def test_mapped_columns_in_jsonl_csv_and_parquet(tmp_path):
    report = inspect_data(write_jsonl(tmp_path / "de.jsonl", GERMAN_ROWS), columns=GERMAN)
    assert report.format == "standard" and report.columns == GERMAN and not report.invalid
    assert_german_pairs(report.pairs, [7, 8])

    with (tmp_path / "de.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(GERMAN_ROWS[0]))
        writer.writeheader()
        writer.writerows(GERMAN_ROWS)
    pairs = load_pairs(tmp_path / "de.csv", columns=GERMAN)
    assert_german_pairs(pairs, ["7", "8"])
    assert [p.row for p in pairs] == [2, 3]

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(GERMAN_ROWS), tmp_path / "de.parquet")
    assert_german_pairs(load_pairs(tmp_path / "de.parquet", columns=GERMAN), [7, 8])


def test_a_mapped_csv_column_holding_json_messages_is_parsed(tmp_path):
    history = json.dumps([user("Hallo!"), assistant("Hallo! Wie kann ich helfen?"), user("Wie spät ist es in Tokio?")], ensure_ascii=False)
    with (tmp_path / "verlauf.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["verlauf", "gut", "schlecht"])
        writer.writerow([history, json.dumps([assistant("Das hängt von deiner Zeitzone ab; Tokio ist UTC+9.")]),
                         json.dumps([assistant("Es ist 12 Uhr.")])])
    report = inspect_data(tmp_path / "verlauf.csv", columns={"prompt": "verlauf", "chosen": "gut", "rejected": "schlecht"})
    assert report.format == "conversational" and not report.invalid
    (pair,) = report.pairs
    assert pair.prompt == [user("Hallo!"), assistant("Hallo! Wie kann ich helfen?"), user("Wie spät ist es in Tokio?")]
    assert (pair.chosen, pair.rejected) == ("Das hängt von deiner Zeitzone ab; Tokio ist UTC+9.", "Es ist 12 Uhr.")


def test_a_mapping_renames_before_detection_for_any_format(tmp_path):
    rows = [{"befehl": "Übersetze ins Englische", "eingabe": "Guten Morgen", "gut": "Good morning", "schlecht": "Good night"}]
    columns = {"instruction": "befehl", "input": "eingabe", "chosen": "gut", "rejected": "schlecht"}
    report = inspect_data(write_jsonl(tmp_path / "alpaca.jsonl", rows), columns=columns)
    assert report.format == "alpaca" and report.pairs[0].prompt == [user("Übersetze ins Englische\nGuten Morgen")]


def test_a_mapping_that_names_a_missing_column_is_refused_before_any_row(tmp_path):
    rows = [{"id": 1, "question": "q", "chosen": "a", "rejected": "b"}, {"broken": True}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataFileError) as err:
        inspect_data(path, columns={"prompt": "frage"})
    assert str(err.value) == (f"{path}: data.columns maps prompt <- 'frage', but the source has no column 'frage'; "
                              "its columns are: broken, chosen, id, question, rejected")
    with pytest.raises(DataFileError) as err:
        load_pairs(path, columns={"prompt": "frage", "system": "sys", "chosen": "chosen"})
    assert str(err.value).endswith("data.columns maps prompt <- 'frage', system <- 'sys', but the source has no columns "
                                   "'frage', 'sys'; its columns are: broken, chosen, id, question, rejected")
    with pytest.raises(ValueError, match="unknown field.*'answer'.*the fields to map to are: prompt, chosen, rejected, "
                                         "system, conversations, instruction, input, history"):
        inspect_data(path, columns={"answer": "chosen"})


def test_undetectable_data_names_every_format_and_the_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"frage": "q", "gut": "a", "schlecht": "b"}])
    with pytest.raises(DataFileError) as err:
        inspect_data(path)
    message = str(err.value)
    assert "cannot tell the data format from the fields ['frage', 'gut', 'schlecht']" in message
    for name in ("standard", "conversational", "implicit", "sharegpt", "alpaca", "hh-rlhf", "ultrafeedback"):
        assert f"{name} {{" in message
    assert "--columns prompt=YOUR_PROMPT_COLUMN" in message and "data.columns in YAML" in message


# ---------------------------------------------------------------- prompt + full conversations (ultrafeedback)

HAIKU = "Write a haiku about autumn leaves."
HAIKU_GOOD = "Crimson leaves drifting\nacross the cold river's face,\nsummer let go slow."


def ultrafeedback_row(prompt, chosen, rejected, prompt_id="3f1c0e"):
    return {"prompt": prompt, "prompt_id": prompt_id, "chosen": chosen, "rejected": rejected, "messages": chosen,
            "score_chosen": 8.5, "score_rejected": 4.0}


UF_ROWS = [
    ultrafeedback_row(HAIKU, [user(HAIKU), assistant(HAIKU_GOOD)], [user(HAIKU), assistant("Leaves fall. The end.")]),
    ultrafeedback_row("  Is a tomato a fruit?\n",  # whitespace around the prompt does not matter
                      [{"role": "system", "content": "Answer like a botanist."}, user("Is a tomato a fruit?"),
                       assistant("Yes: botanically it is a berry, grown from the flower's ovary.")],
                      [{"role": "system", "content": "Answer like a botanist."}, user("Is a tomato a fruit?"),
                       assistant("No, it is a vegetable.")], prompt_id="9a7d21"),
    ultrafeedback_row([user("Name a planet."), assistant("Mars."), user("Another one?")],
                      [user("Name a planet."), assistant("Mars."), user("Another one?"), assistant("Jupiter.")],
                      [user("Name a planet."), assistant("Mars."), user("Another one?"), assistant("Mars.")], prompt_id="c44b90"),
]


def test_ultrafeedback_rows_take_the_answers_after_the_repeated_prompt(tmp_path):
    report = inspect_data(write_jsonl(tmp_path / "uf.jsonl", UF_ROWS))
    assert report.format == "ultrafeedback" and not report.invalid
    haiku, tomato, planet = report.pairs
    assert haiku.prompt == [user(HAIKU)] and haiku.system is None
    assert (haiku.chosen, haiku.rejected) == (HAIKU_GOOD, "Leaves fall. The end.")
    assert haiku.meta == {"prompt_id": "3f1c0e", "score_chosen": 8.5, "score_rejected": 4.0}  # `messages` is a list
    assert tomato.system == "Answer like a botanist." and tomato.prompt == [user("Is a tomato a fruit?")]
    assert tomato.chosen == "Yes: botanically it is a berry, grown from the flower's ovary."
    assert planet.prompt == [user("Name a planet."), assistant("Mars."), user("Another one?")]
    assert (planet.chosen, planet.rejected) == ("Jupiter.", "Mars.")

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(UF_ROWS[:2]), tmp_path / "uf.parquet")  # one column type per file
    assert [p.chosen for p in load_pairs(tmp_path / "uf.parquet")] == [HAIKU_GOOD, tomato.chosen]


def test_answer_only_lists_stay_conversational(tmp_path):
    row = {"prompt": [user(HAIKU)], "chosen": [assistant(HAIKU_GOOD)], "rejected": [assistant("No.")], "score_chosen": 9}
    report = inspect_data(write_jsonl(tmp_path / "conv.jsonl", [row]))
    assert report.format == "conversational" and report.pairs[0].chosen == HAIKU_GOOD


def test_ultrafeedback_broken_rows_are_reported_row_by_row(tmp_path):
    rows = UF_ROWS[:1] + [
        ultrafeedback_row(HAIKU, [user("Write a haiku about spring rain."), assistant("Soft rain on the roof.")],
                          [user("Write a haiku about spring rain."), assistant("Rain.")]),  # 2: disagrees with prompt
        ultrafeedback_row(HAIKU, [user(HAIKU), assistant(HAIKU_GOOD)],
                          [user("Write a limerick about autumn leaves."), assistant("There once was a leaf...")]),  # 3
        ultrafeedback_row(HAIKU, [user(HAIKU), assistant(HAIKU_GOOD), user("Thanks!")],
                          [user(HAIKU), assistant("Leaves.")]),  # 4: chosen ends with the user
        ultrafeedback_row(HAIKU, [user(HAIKU), assistant(HAIKU_GOOD)], [user(HAIKU), assistant(HAIKU_GOOD)]),  # 5
        ultrafeedback_row(HAIKU, [user(HAIKU), assistant(" ")], [user(HAIKU), assistant("Leaves.")]),  # 6
    ]
    report = inspect_data(write_jsonl(tmp_path / "uf_bad.jsonl", rows))
    assert report.format == "ultrafeedback" and [p.row for p in report.pairs] == [1]
    assert {r.row: r.reason for r in report.invalid} == {
        2: "the conversations disagree with 'prompt' (message 1 is user 'Write a haiku about autumn leaves.' in "
           "prompt but user 'Write a haiku about spring rain.' in the conversations)",
        3: "chosen and rejected conversations differ before their final assistant message (message 1 is user "
           "'Write a haiku about autumn leaves.' in chosen but user 'Write a limerick about autumn leaves.' in rejected)",
        4: "chosen must end with an assistant message (the response)",
        5: "chosen == rejected: the pair teaches nothing",
        6: "empty response: 'chosen' is blank",
    }
