"""Writes examples/mini_alpaca.jsonl: the project's own small Alpaca-format example set.

Hand-written for mergeit-hf (Apache-2.0): seven topics, each with close paraphrases so that stage 1
finds pairs to merge, plus one row with an empty instruction and one exact duplicate, so the demo
also shows rows being dropped and counted.
"""

import json
from pathlib import Path

ROWS = [
    # cooking
    (
        "Give me a simple recipe for scrambled eggs.",
        "",
        "Whisk 3 eggs with a pinch of salt. Melt butter in a pan over low heat, add the eggs and stir slowly "
        "until just set, about 3 minutes. Serve at once.",
    ),
    (
        "How do I make fluffy scrambled eggs?",
        "",
        "Beat the eggs well, cook them over low heat in butter, stir gently and take them off the heat while "
        "they still look slightly wet; they finish cooking on the plate.",
    ),
    (
        "Suggest a quick vegetarian dinner that takes under 20 minutes.",
        "",
        "Chickpea and spinach curry: fry an onion and garlic, add curry paste, a tin of chickpeas, a tin of "
        "tomatoes and two handfuls of spinach; simmer 10 minutes and serve with rice.",
    ),
    (
        "Recommend a fast meat-free weeknight dinner.",
        "",
        "Try a vegetable stir-fry with tofu: fry cubed tofu until golden, add sliced peppers, broccoli and "
        "soy sauce, and serve over noodles. It takes about 15 minutes.",
    ),
    (
        "Convert this recipe amount from cups to grams.",
        "2 cups of flour",
        "2 cups of all-purpose flour weigh about 250 grams.",
    ),
    (
        "How many grams are in the given amount of sugar?",
        "1 cup of granulated sugar",
        "1 cup of granulated sugar weighs about 200 grams.",
    ),
    # programming
    (
        "Write a Python function that reverses a string.",
        "",
        "def reverse(text: str) -> str:\n    return text[::-1]",
    ),
    (
        "Show how to reverse a string in Python.",
        "",
        "Use slicing with a step of -1: 'hello'[::-1] returns 'olleh'.",
    ),
    (
        "Write a Python function that checks whether a number is prime.",
        "",
        "def is_prime(n: int) -> bool:\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
        "        if n % i == 0:\n            return False\n        i += 1\n    return True",
    ),
    (
        "Implement a prime-number test in Python.",
        "",
        "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
    ),
    (
        "Explain what a Python list comprehension is.",
        "",
        "A list comprehension builds a list from an iterable in one expression, e.g. [x * x for x in range(5)] "
        "gives [0, 1, 4, 9, 16]; an optional if clause filters items.",
    ),
    (
        "What does a list comprehension do in Python? Give an example.",
        "",
        "It creates a new list by applying an expression to each item of an iterable: "
        "[word.upper() for word in ['a', 'b']] returns ['A', 'B'].",
    ),
    # travel
    (
        "Plan a one-day walking itinerary for Lisbon.",
        "",
        "Morning: Alfama and the castle. Lunch in Baixa. Afternoon: tram 28 to Estrela, then Bairro Alto. "
        "Evening: sunset at Miradouro de Santa Catarina.",
    ),
    (
        "Suggest what to see in Lisbon in a single day on foot.",
        "",
        "Start at Praça do Comércio, climb through Alfama to São Jorge Castle, walk down to Chiado for lunch "
        "and end the day at a miradouro for the view.",
    ),
    (
        "List five things to pack for a beach holiday.",
        "",
        "Sunscreen, a swimsuit, sunglasses, a hat and a reusable water bottle.",
    ),
    (
        "What should I bring on a trip to the seaside? Give five items.",
        "",
        "A towel, sunscreen, flip-flops, a book and a water bottle.",
    ),
    (
        "How can I avoid jet lag on a long flight east?",
        "",
        "Shift your sleep an hour earlier each day before the trip, drink water, avoid alcohol on the plane, "
        "and get morning daylight after you land.",
    ),
    (
        "Give tips to reduce jet lag when flying across time zones.",
        "",
        "Adjust your bedtime before leaving, stay hydrated, sleep on the plane if it is night at your "
        "destination, and spend time outdoors on arrival.",
    ),
    # health
    (
        "Give three tips for staying healthy.",
        "",
        "1. Eat a balanced diet with plenty of vegetables. 2. Exercise regularly. 3. Get seven to nine hours of sleep.",
    ),
    (
        "What are three simple habits for better health?",
        "",
        "Walk every day, drink enough water, and keep a regular sleep schedule.",
    ),
    (
        "Describe a five-minute stretching routine for office workers.",
        "",
        "Neck rolls (1 min), shoulder shrugs (1 min), seated spinal twist (1 min each side), and standing "
        "hamstring stretch (1 min).",
    ),
    (
        "Suggest quick stretches I can do at my desk.",
        "",
        "Roll your shoulders, stretch your wrists, twist gently in your chair, and stand to stretch your "
        "calves against the desk.",
    ),
    # writing
    (
        "Rewrite the sentence in the passive voice.",
        "The committee approved the new budget.",
        "The new budget was approved by the committee.",
    ),
    (
        "Change the following sentence to passive voice.",
        "The chef prepared a delicious meal.",
        "A delicious meal was prepared by the chef.",
    ),
    (
        "Summarize the text in one sentence.",
        "Bees pollinate about a third of the crops we eat. Their numbers have fallen because of pesticides, "
        "habitat loss and disease, which threatens food supplies.",
        "Falling bee populations, caused by pesticides, habitat loss and disease, threaten the many crops "
        "that depend on their pollination.",
    ),
    (
        "Write a one-sentence summary of the passage.",
        "Remote work grew sharply after 2020. Many employees value the flexibility, while companies worry "
        "about collaboration and training new staff.",
        "Remote work has grown since 2020, bringing flexibility for employees but collaboration and "
        "training concerns for companies.",
    ),
    (
        "Write a haiku about autumn.",
        "",
        "Crisp leaves drift and fall\ngolden light on quiet paths\nthe year breathes out slow",
    ),
    (
        "Compose a short haiku about falling leaves.",
        "",
        "Red leaves let go now\nspinning down on the cold wind\nearth takes them softly",
    ),
    # science
    (
        "Explain why the sky is blue.",
        "",
        "Sunlight is scattered by air molecules, and shorter blue wavelengths scatter much more than red "
        "ones (Rayleigh scattering), so blue light reaches our eyes from every direction of the sky.",
    ),
    (
        "Why does the sky look blue during the day?",
        "",
        "Air molecules scatter short wavelengths of sunlight more strongly, so scattered blue light fills the sky.",
    ),
    (
        "What is photosynthesis?",
        "",
        "Photosynthesis is the process by which plants use light energy to turn carbon dioxide and water "
        "into glucose and oxygen.",
    ),
    (
        "Describe photosynthesis in simple terms.",
        "",
        "Plants capture sunlight and use its energy to make sugar from water and carbon dioxide, releasing oxygen.",
    ),
    ("Convert the temperature from Celsius to Fahrenheit.", "25 °C", "25 °C is 77 °F."),
    ("What is the given temperature in Fahrenheit?", "100 °C", "100 °C is 212 °F."),
    # money
    (
        "Give three tips for saving money on groceries.",
        "",
        "Plan meals and shop with a list, buy store brands, and check unit prices.",
    ),
    (
        "How can I spend less at the supermarket?",
        "",
        "Avoid shopping hungry, buy seasonal produce, and compare prices per kilogram.",
    ),
    (
        "Explain compound interest with an example.",
        "",
        "Compound interest earns interest on past interest: 1,000 at 5% a year grows to 1,050 after one "
        "year and 1,102.50 after two.",
    ),
    (
        "What is compound interest?",
        "",
        "It is interest calculated on the initial amount plus the interest already added, so savings grow "
        "faster over time.",
    ),
    (
        "Calculate the monthly payment of the loan.",
        "10,000 at 0% interest over 20 months",
        "10,000 / 20 = 500 per month.",
    ),
    (
        "Work out the monthly repayment.",
        "6,000 borrowed at 0% interest over 12 months",
        "6,000 / 12 = 500 per month.",
    ),
    # bad input on purpose: dropped and counted
    ("   ", "", "This row has no instruction and is dropped."),
    (
        "Give three tips for staying healthy.",
        "",
        "1. Eat a balanced diet with plenty of vegetables. 2. Exercise regularly. 3. Get seven to nine hours of sleep.",
    ),
]


def main() -> None:
    path = Path(__file__).with_name("mini_alpaca.jsonl")
    with path.open("w", encoding="utf-8") as out:
        for instruction, input_text, output in ROWS:
            out.write(json.dumps({"instruction": instruction, "input": input_text, "output": output}) + "\n")
    print(f"wrote {len(ROWS)} rows to {path}")


if __name__ == "__main__":
    main()
