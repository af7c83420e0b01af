"""
The tag rules (TagAlign Sec. 3.1): how a parser's answer, the compact line "objects | attributes" an
LLM writes (or NLTK's nouns and adjectives), becomes the tags TagAlign trains on. Pure functions of
the answer and, for grounding, of the caption: leading describing words move to the attributes,
objects are singularised, function words go, and (grounding) a tag must be a word of the caption.
parse_tags.py records the raw answers, so that `python parse_tags.py rederive` can apply changed
rules without the LLM; rules_version() names the rules a record was made under.

    >>> from tag_rules import parse_answer
    >>> parse_answer("two red buses, the grass | red", "Two red buses on the grass")
    (['bus', 'grass'], ['red'])
"""
import ast
import hashlib
import html
import io
import json
import os
import re
import tokenize

# longer captions are cut (at a word boundary) to keep the prompt inside the context
MAX_CAPTION_CHARS = 600


# Quantity nouns: dropped before a noun ('a couple of people'), an object alone ('a couple').
QUANTITIES = {"couple", "pair", "group", "dozen", "lots", "bunch", "set", "row", "pile", "stack"}
ARTICLES = {"a", "an", "the", "some", "many", "several", "few", "various", "lots", "of", "one",
            "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "this", "that",
            "these", "those", "his", "her", "their", "its", "my", "our", "your", "other", "another"}
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person",
             "persons": "person", "feet": "foot", "teeth": "tooth", "mice": "mouse",
             "geese": "goose", "oxen": "ox", "leaves": "leaf", "knives": "knife", "wives": "wife",
             "wolves": "wolf", "calves": "calf", "halves": "half", "shelves": "shelf",
             "loaves": "loaf", "thieves": "thief", "scarves": "scarf", "lives": "life",
             "dice": "die", "cacti": "cactus", "fungi": "fungus", "criteria": "criterion",
             "phenomena": "phenomenon", "axes": "axe", "quizzes": "quiz", "data": "data",
             "media": "media", "hooves": "hoof", "elves": "elf", "selves": "self",
             "dwarves": "dwarf", "wharves": "wharf"}
# Singulars ending in -i or -u, whose plural ends in -is or -us (skis, menus):
# not the -is/-us singulars.
I_U_SINGULAR = {"ski", "taxi", "bikini", "kiwi", "menu", "emu", "guru", "tutu", "sari", "salami",
                "martini", "safari", "origami", "alibi", "khaki", "tofu", "haiku", "gnu", "zebu",
                "tiramisu", "bonsai", "samurai", "wasabi", "jacuzzi", "kimono", "mini", "deli",
                "yeti", "chili", "tipi", "cockatoo"}
# Plural-looking words that are singular or have no singular: kept as they are.
UNCHANGED = {"glasses", "jeans", "pants", "shorts", "scissors", "trousers", "sunglasses", "series",
             "species", "news", "sheep", "fish", "deer", "clothes", "stairs", "goggles",
             "headphones", "tongs", "pliers", "binoculars", "leggings", "tights", "overalls",
             "pajamas", "pyjamas", "mathematics", "physics", "aircraft", "means", "headquarters",
             "barracks", "crossroads", "gymnastics", "athletics", "politics", "economics",
             "electronics", "diabetes", "measles", "billiards", "darts", "leathers", "always"}
# Singular nouns ending in s: kept, and their -es plural maps back to them
# (gases -> gas, lenses -> lens).
S_SINGULAR = {"gas", "bus", "canvas", "lens", "chaos", "atlas", "bias", "alias", "christmas",
              "pancreas", "cosmos", "ethos", "kudos", "rhinoceros", "asbestos", "iris", "virus",
              "bonus", "cactus", "campus", "circus", "octopus", "walrus", "census", "chorus",
              "hippopotamus", "platypus", "abacus", "citrus", "fungus", "lotus", "crocus",
              "hibiscus", "asparagus", "bus", "plus", "minus", "tennis", "analysis", "oasis",
              "axis", "thesis", "basis", "trellis", "pelvis", "octopus", "papyrus", "torus",
              "uterus", "iris", "apparatus", "status", "focus", "genius", "mucus", "chassis",
              "debris", "corps", "bras", "texas", "paris", "los", "das", "mattress", "dress",
              "glass", "grass", "moss", "boss", "chess", "cross"}
# Singulars ending in -ie (cookies -> cookie, not cooky) and in -che (headaches -> headache).
IE_SINGULAR = {"cookie", "movie", "pie", "tie", "lie", "zombie", "hippie", "rookie", "brownie",
               "smoothie", "selfie", "calorie", "prairie", "genie", "hoodie", "beanie", "birdie",
               "goalie", "bootie", "sweetie", "collie", "veggie", "freebie", "auntie", "newbie",
               "cutie", "magpie", "lingerie", "necktie", "bowtie", "bookie", "yuppie", "roomie",
               "techie", "foodie", "boogie", "pixie", "doggie", "kiddie", "budgie", "cabbie",
               "groupie", "junkie", "nightie", "quickie", "sortie", "talkie", "walkie", "coterie",
               "menagerie", "eyrie", "specie", "barbie", "bikie", "indie", "aussie", "kittie"}
CHE_SINGULAR = {"headache", "niche", "cache", "moustache", "mustache", "avalanche", "creche",
                "quiche", "cliche", "psyche", "microfiche", "panache", "attache", "toothache",
                "stomachache", "earache", "backache"}
O_ES = {"tomatoes", "potatoes", "heroes", "echoes", "volcanoes", "mangoes", "buffaloes",
        "tornadoes", "dominoes", "torpedoes", "mosquitoes", "vetoes", "embargoes"}


def singularize(word):
    """English plural -> singular by rule, e.g. buses -> bus, berries -> berry, cookies -> cookie,
    boxes -> box, knives -> knife, gases -> gas; singulars ending in s (canvas, lens, chaos) and
    pluralia tantum (glasses, series, species) are kept."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in UNCHANGED or word in S_SINGULAR or len(word) <= 3 or not word.endswith("s"):
        return word
    if word[:-1] in I_U_SINGULAR:
        return word[:-1]
    if word.endswith("es") and word[:-2] in S_SINGULAR:
        return word[:-2]
    if word.endswith("ies"):
        return word[:-1] if word[:-1] in IE_SINGULAR else word[:-3] + "y"
    if word in O_ES:
        return word[:-2]
    if word.endswith("ches") and word[:-1] in CHE_SINGULAR:
        return word[:-1]
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-3] if word.endswith("zzes") else word[:-2]
    if word.endswith(("ss", "us", "is", "ous")):
        return word
    return word[:-1]


# Words that describe rather than name: colours, sizes, shapes, ages, states, materials. Used to
# split "red bus" into object "bus" + attribute "red" (a true compound such as "teddy bear" has no
# such modifier and stays) and to decide which list a word belongs to when the LLM puts it in both.
# Materials are also nouns ("a glass").
# In these word lists, a backslash at a line's end continues the line: the lists' text, line breaks
# included, is part of rules_version's hash.
ADJECTIVES = set("""
red orange yellow green blue purple pink brown black white grey gray silver gold golden beige tan \
maroon burgundy
navy teal turquoise violet crimson ivory dark light bright pale colorful colourful multicolored \
multicoloured blond
blonde khaki neon pastel
small large big huge giant tiny little tall short long wide narrow thin thick fat massive mini \
miniature enormous
high low deep shallow slim skinny
old young new elderly older younger ancient modern vintage antique retro classic aged teenage adult
empty full open closed broken wet dry clean dirty messy cluttered crowded busy quiet calm parked \
frozen snowy sunny
cloudy rainy foggy misty stormy cold hot warm fresh ripe sliced cooked fried grilled baked raw \
burnt lit dim shiny
rusty abandoned covered filled loaded striped spotted checkered plaid floral patterned plain \
decorated curly
straight bald bearded smiling happy sad asleep seated naked cute beautiful pretty ugly funny odd \
strange scary
spooky cozy rustic elegant fancy simple tidy neat cramped spacious creamy crispy juicy sweet \
delicious tasty healthy
homemade organic fluffy furry hairy smooth soft hard rough round square rectangular circular oval \
triangular curved
flat pointed wild domestic tropical rural urban outdoor indoor scenic aerial sandy grassy rocky \
muddy dusty leafy
wooded lush barren bare electric digital wireless double single male female lovely sleepy tired \
blurry blurred vibrant
glossy matte transparent clear vacant advanced customized custom extended sheltered political \
seamless caucasian
asian african traditional colonial gothic historic medieval futuristic festive sparkling glowing \
setting rising
stuffed decorative attractive expensive cheap luxurious luxury fake artificial natural dead alive \
sick injured
hungry angry excited surprised serious tan dense sparse steep snowcapped overcast sunlit shady \
shaded hazy
""".split())
MATERIALS = set("""
wooden wood metal metallic plastic glass stone brick leather concrete marble steel iron paper \
ceramic wool woolen
woollen cotton silk denim velvet rubber copper bronze crystal clay porcelain granite bamboo wicker \
straw lace
knitted chrome aluminum aluminium tin cardboard
""".split())
MODIFIERS = ADJECTIVES | MATERIALS
# Describing words that are also things: alone in the object list they stay objects
# ("a square", "an orange").
NOUNS_TOO = set("""
square round light orange gold silver cream ivory olive navy teal violet lime khaki pastel neon \
plain double
classic adult male female custom luxury antique
""".split())
# Compound nouns that start with a describing word: kept whole.
COMPOUNDS = {"hot dog", "hot tub", "hot air", "hot sauce", "high chair", "high heel",
             "sweet potato", "green bean", "double decker", "flat screen", "light bulb",
             "light house", "white board", "black board", "red carpet", "teddy bear", "polar bear",
             "golden retriever", "fire hydrant", "cold cut", "dry cleaner", "full moon",
             "little league", "square meter", "round table", "open house", "light switch",
             "dark room", "high school", "orange juice", "lemon juice", "lime juice", "orange peel",
             "orange tree"}


def _clean_words(text):
    text = html.unescape(str(text)).lower()
    # punctuation and digits out; hyphens inside words stay
    text = re.sub(r"[^\w\s-]|\d|_", " ", text)
    return [w.strip("-") for w in text.split() if w.strip("-")]


# Function words and common verbs: never a tag
# (a small model lists "on", "between", "waiting" as tags).
STOPWORDS = set("""
in on at by with of to for from over under between behind near next into onto out outside inside \
up down off
around through across along against during before after above below beside beneath beyond among \
toward towards
and or but nor so yet is are was were be been being has have had do does did can could will would \
should may
might must it he she they we you i me him them us who what where when how why which there here \
more most very
too also just not no either both each every all any as than then such own same while together \
other else
something anything nothing someone everyone thing things way lots part kind type types bit
""".split())
# Stopwords that name a thing at the end of an object ('trash can', 'watering can'):
# kept in objects.
OBJECT_STOPWORDS = STOPWORDS - {"can"}
# -ing words that are nouns, kept as objects
# (other single -ing objects are actions: sitting, waiting).
ING_NOUNS = set("""
building ceiling painting clothing railing ring king wing string swing sling spring pudding \
stuffing icing
frosting dumpling earring sibling wedding morning evening awning siding landing stocking ping \
bedding topping
filling seasoning dressing drawing carving lighting fencing flooring housing sting thing ding \
lightning opening
duckling sapling starling seedling gosling yearling hatchling fledgling nestling herring viking
""".split())
# Adjective endings that are safe enough (nouns with them are rare); -al, -ic, -ive, -en, -y are not
# (animal, traffic, olive, kitchen, city), so those adjectives are in ADJECTIVES by name.
DESCRIBING_ENDINGS = ("ful", "ous", "less", "ish")
MORE_ADJECTIVES = set("""
rural political tropical digital vertical horizontal traditional colonial industrial natural \
floral tribal royal
electric exotic classic rustic metallic historic gothic iconic romantic dramatic scenic majestic \
artistic athletic
geometric abstract massive decorative attractive creative active wooden golden woolen frozen \
broken fallen hidden
wooden sunken snowy sunny rainy cloudy sandy grassy rocky muddy dusty leafy hilly icy windy shiny \
creamy juicy
crispy spicy salty fluffy furry hairy fuzzy bumpy dirty messy tiny pretty lovely ugly empty busy \
heavy
""".split())


def describes(word):
    """Is `word` a describing word (an attribute): a known colour/size/shape/age/state/material
    word, or an adjective by a safe ending (-ful, -ous, -less, -ish) or a past participle (parked,
    striped, customized)."""
    if word in ADJECTIVES or word in MATERIALS or word in MORE_ADJECTIVES:
        return True
    if (len(word) > 5 and word.endswith(DESCRIBING_ENDINGS)
            and word not in ("radish", "relish", "polish", "parish")):
        return True
    return (len(word) > 4 and word.endswith("ed")
            and not word.endswith(("eed", "bed", "shed", "stead")))


def normalize_tags(objects, attributes, max_object_words=3):
    """Pure normalisation of the LLM's answer:
    - lower case, HTML unescaped, punctuation and digits removed (inner hyphens kept: 't-shirt');
    - objects: leading articles, quantities and possessives dropped ('the two buses' -> 'buses'),
      function words at either end dropped ('in pictures' -> 'pictures'), the last word singularised
      ('hot dogs' -> 'hot dog'), at most max_object_words words; a leading describing word is moved
      to the attributes ('red buses' -> object 'bus', attribute 'red'; compounds such as
      'teddy bear' stay); a lone adjective ('small') is an attribute; a lone -ing word is an action,
      not an object ('waiting'; 'building' stays);
    - attributes: single words (a multi-word attribute is split: 'dark blue' -> 'dark', 'blue'),
      describing words only (describes()): nouns and verbs the LLM puts there are dropped;
    - never both: an attribute that names an object of the caption ('cars' next to 'car') is
      dropped;
    - empty strings and duplicates removed, first occurrence order kept.
    Returns (objects, attributes) as lists of str."""
    def unique(items):
        return list(dict.fromkeys(i for i in items if i))

    attrs = [w for attr in (attributes if isinstance(attributes, list) else [])
             for w in _clean_words(attr)
             if w not in ARTICLES and w not in STOPWORDS and w not in QUANTITIES]
    objs, moved = [], []
    for obj in objects if isinstance(objects, list) else []:
        words = _clean_words(obj)
        while words and (words[-1] in OBJECT_STOPWORDS or words[-1] in ARTICLES):
            words = words[:-1]
        # function words and describing words off the front ('black and white dog' -> dog)
        while words:
            if (words[0] in ARTICLES or words[0] in OBJECT_STOPWORDS
                    or words[0] in QUANTITIES and len(words) > 1):
                words = words[1:]
            elif len(words) > 1 and (words[0] in MODIFIERS or words[0] in attrs) and \
                    f"{words[0]} {singularize(words[1])}" not in COMPOUNDS:
                moved.append(words.pop(0))
            else:
                break
        if len(words) == 1 and words[0] in ADJECTIVES and words[0] not in NOUNS_TOO:
            moved.append(words.pop())
        if len(words) == 1 and words[0].endswith("ing") and words[0] not in ING_NOUNS:
            continue
        if words and len(words) <= max_object_words:
            objs.append(" ".join(words[:-1] + [singularize(words[-1])]))
    objs = unique(objs)
    object_words = {w for o in objs for w in o.split()}
    attrs = [a for a in unique(moved + attrs) if describes(a) and singularize(a) not in object_words
             and a not in object_words]
    return objs, attrs


# Grounding (which tags must come from the caption's own words). Measured on the hand-labelled set
# with SmolLM2 (benchmarks/bench_parse_tags.py): see DEFAULT_GROUNDING.
GROUNDING = {
    "none": "keep every tag the LLM gives",
    "attributes": "an attribute must be a word of the caption; objects are free (normalised forms, "
                  "e.g. person)",
    "all": "attributes as above; an object's last word must also be a (singularised) word of the "
           "caption",
}
DEFAULT_GROUNDING = "all"


def ground_tags(objects, attributes, caption, grounding=DEFAULT_GROUNDING):
    """Drop tags that are not in the caption, as the grounding mode says (GROUNDING). `caption` is
    the text the LLM saw (prepare_caption's output)."""
    if grounding not in GROUNDING:
        raise ValueError(f"grounding {grounding!r}: choose one of {sorted(GROUNDING)}")
    if grounding == "none":
        return objects, attributes
    words = _clean_words(caption)
    parts = {p for w in words for p in w.split("-")}
    vocab = set(words) | parts
    attributes = [a for a in attributes if a in vocab]
    if grounding == "all":
        nouns = {singularize(w) for w in vocab}
        objects = [o for o in objects
                   if singularize(o.split()[-1]) in nouns or o.replace(" ", "") in vocab]
    return objects, attributes


def has_letters(text):
    return any(ch.isalpha() for ch in text)


def prepare_caption(text, max_chars=MAX_CAPTION_CHARS):
    """Raw caption -> the text the LLM sees: HTML entities decoded and tags stripped, CC12M's
    <PERSON>-style placeholders made plain words, characters of the answer formats ({}[]|") made
    spaces (a caption holding a JSON fragment or a fake answer line is data, not an answer),
    whitespace collapsed, cut at a word boundary after max_chars."""
    text = html.unescape(html.unescape(str(text)))
    text = re.sub(r"<\s*(person|location|organization|date|time|number)\s*>",
                  lambda m: m.group(1).lower(), text, flags=re.IGNORECASE)
    text = re.sub(r"<[^>]{0,200}>", " ", text)
    text = re.sub(r'[{}\[\]|"\\]', " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def split_answer(text):
    """The LLM's raw answer (the compact line, or JSON from LlamaTagger) -> (objects, attributes) as
    given; raises ValueError with the reason if malformed."""
    if not text or not text.strip():
        raise ValueError("empty answer")
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at {e.pos})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("objects"), list) \
                or not isinstance(obj.get("attributes"), list):
            raise ValueError("JSON without the lists 'objects' and 'attributes'")
        return obj["objects"], obj["attributes"]
    if text.count("|") != 1:
        raise ValueError("not 'objects | attributes'")
    lists = []
    for part in text.split("|"):
        part = part.strip()
        lists.append([] if part in ("-", "") else [t.strip() for t in part.split(",")])
    return lists[0], lists[1]


def parse_answer(text, caption=None, grounding=DEFAULT_GROUNDING):
    """The LLM's raw answer -> (objects, attributes) normalised, and grounded in `caption` (the text
    the LLM saw) when given; raises ValueError with the reason if malformed. An explicit empty
    answer ('- | -') is valid."""
    objects, attributes = normalize_tags(*split_answer(text))
    if caption is not None:
        objects, attributes = ground_tags(objects, attributes, caption, grounding)
    return objects, attributes


def format_answer(objects, attributes):
    """(objects, attributes) -> the compact answer line, e.g. 'kitten, grass | small'."""
    return f"{', '.join(objects) or '-'} | {', '.join(attributes) or '-'}"


# --------------------------------------------------------------------------------------------------
# The NLTK parser (paper Table 4's second row): nouns and adjectives from NLTK's part-of-speech
# tagger, written as the LLM's answer line so that the same normalisation, grounding, records,
# resume, merge and vocabulary apply

# common nouns; proper nouns (NNP, NNPS: names, places) are no visible objects
NOUN_TAGS = ("NN", "NNS")
ADJECTIVE_TAGS = ("JJ", "JJR", "JJS")
NLTK_DATA = "averaged_perceptron_tagger_eng"


class NltkTagger:
    """caption -> 'objects | attributes' from NLTK's averaged perceptron tagger on NLTK's Penn
    Treebank tokenisation (its tagger's training text: "dog's" -> dog 's; no download needed): each
    run of adjacent common nouns is one object ('teddy bear'; its last 3 words, the longest object
    normalize_tags keeps), each adjective an attribute. Same call as the LLM backends (strict is
    ignored: a tagger has no malformed answers).
    tagger: any object with NLTK's .tag(tokens) (tests train one)."""

    def __init__(self, tagger=None):
        try:
            from nltk.tokenize import TreebankWordTokenizer
        except ImportError:
            raise FileNotFoundError("--parser nltk needs the nltk package: "
                                    "pip install nltk") from None
        if tagger is None:
            try:
                from nltk.tag import PerceptronTagger
                tagger = PerceptronTagger()
            except LookupError:
                raise FileNotFoundError("NLTK's tagger data is missing: run "
                                        f"`python -m nltk.downloader {NLTK_DATA}`") from None
        self.tagger, self.words = tagger, TreebankWordTokenizer()
        self.prefix_text, self.suffix_text = "nltk", NLTK_DATA

    def __call__(self, caption, strict=False):
        objects, attributes, run = [], [], []
        for word, tag in self.tagger.tag(self.words.tokenize(caption)) + [("", "")]:
            if tag in NOUN_TAGS:
                run.append(word)
                continue
            if run:
                objects.append(" ".join(run[-3:]))
                run = []
            if tag in ADJECTIVE_TAGS:
                attributes.append(word)
        return format_answer(objects, attributes)

    def settings(self, grounding):
        """What decides a record (as parse_settings for an LLM): the tagger (weights, word -> tag
        dictionary, classes), the tag sets and the caption cut."""
        import pickle
        model = getattr(self.tagger, "model", None)
        import inspect
        state = (sorted((f, sorted(w.items())) for f, w in getattr(model, "weights", {}).items()),
                 sorted(getattr(self.tagger, "tagdict", {}).items()),
                 sorted(getattr(self.tagger, "classes", ())), NOUN_TAGS, ADJECTIVE_TAGS,
                 MAX_CAPTION_CHARS, inspect.getsource(NltkTagger.__call__))
        digest = hashlib.blake2b(pickle.dumps(state), digest_size=8).hexdigest()
        return {"parser": "nltk", "tagger": digest, "grounding": grounding,
                "rules": rules_version()}



def rules_version():
    """A hash of the tag rules: this file's code lines (comments, docstrings, blank space and the
    NLTK tagger left out, so that a comment edit keeps it, on every Python version) and the word
    lists as they are now. Recorded with the records, so that a rule change is not mixed into a run
    silently (`rederive` applies today's rules to the stored raw answers instead)."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        source = f.read()
    skip = set()  # lines of docstrings and of NltkTagger
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "NltkTagger":
            skip.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = source.splitlines()
    for tok in reversed(list(tokenize.generate_tokens(io.StringIO(source).readline))):
        if tok.type == tokenize.COMMENT:  # the same positions on every Python version
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    code = [" ".join(line.split()) for i, line in enumerate(lines, 1) if i not in skip]
    code = [line for line in code if line]
    words = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
             for k, v in sorted(globals().items())
             if k.isupper() and isinstance(v, (set, frozenset, dict, tuple))}
    text = json.dumps([code, words], sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
