"""The Java-properties reader behind est.properties."""

from twisted.trial.unittest import SynchronousTestCase

from estgw.properties import PropertiesError, parse_properties


def values(text: str) -> dict[str, str]:
    return {key: value for key, (value, _line) in parse_properties(text).items()}


class SeparatorTests(SynchronousTestCase):
    def test_equals_colon_and_whitespace(self) -> None:
        """``key = value``, ``key: value``, ``key value`` and ``key=value``
        all separate a key from its value; blanks around the separator go."""
        self.assertEqual(
            values("a = 1\nb: 2\nc 3\nd=4\ne\t=\t5\nf \f 6\n"),
            {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"},
        )

    def test_only_the_first_separator_counts(self) -> None:
        """A value may itself hold ``=`` and ``:`` (URLs, attr=value lists)."""
        self.assertEqual(
            values("url = https://h:8443/a?b=c\nx=y=z\n"),
            {"url": "https://h:8443/a?b=c", "x": "y=z"},
        )

    def test_key_without_value(self) -> None:
        """A bare key, or a key and separator, has the empty value."""
        self.assertEqual(values("a\nb =\nc:\n"), {"a": "", "b": "", "c": ""})

    def test_leading_whitespace_ignored(self) -> None:
        """Indented lines are read like unindented ones."""
        self.assertEqual(values("   a = 1\n\t b = 2\n"), {"a": "1", "b": "2"})

    def test_escaped_separators_in_key(self) -> None:
        """``\\=``, ``\\:`` and ``\\ `` belong to the key, not the separator."""
        self.assertEqual(
            values("a\\=b = 1\nc\\:d: 2\ne\\ f 3\n"),
            {"a=b": "1", "c:d": "2", "e f": "3"},
        )


class CommentTests(SynchronousTestCase):
    def test_hash_and_bang_comments_and_blank_lines(self) -> None:
        """Lines starting (after blanks) with # or ! and blank lines are skipped."""
        text = "# comment\n! also\n\n   # indented\n  \t\na = 1\n"
        self.assertEqual(values(text), {"a": "1"})

    def test_hash_inside_a_value_is_content(self) -> None:
        """A # after the start of the line is part of the value (no inline comments)."""
        self.assertEqual(values("a = x # y\n"), {"a": "x # y"})

    def test_comment_ending_in_backslash_does_not_continue(self) -> None:
        """A comment line never continues, even if it ends with a backslash."""
        self.assertEqual(values("# note \\\na = 1\n"), {"a": "1"})


class ContinuationTests(SynchronousTestCase):
    def test_backslash_continues_and_leading_blanks_go(self) -> None:
        """An odd number of trailing backslashes joins the next line, whose
        leading blanks are dropped."""
        self.assertEqual(
            values("a = one, \\\n     two, \\\n\tthree\nb = 2\n"),
            {"a": "one, two, three", "b": "2"},
        )

    def test_even_backslashes_do_not_continue(self) -> None:
        """``\\\\`` at the end is an escaped backslash, not a continuation."""
        self.assertEqual(values("a = x\\\\\nb = 2\n"), {"a": "x\\", "b": "2"})

    def test_escaped_trailing_space_does_not_swallow_next_line(self) -> None:
        """``\\ `` at the end of a line is an escaped space; the next line
        stays its own key (it used to be glued onto the value)."""
        self.assertEqual(
            values("realm = EST\\ \nhandler.1.operation = cacerts\n"),
            {"realm": "EST ", "handler.1.operation": "cacerts"},
        )

    def test_continued_line_starting_with_hash_is_content(self) -> None:
        """A continuation line beginning with # is value text, not a comment."""
        self.assertEqual(values("a = x\\\n  #y\n"), {"a": "x#y"})

    def test_continuation_at_end_of_file(self) -> None:
        """A backslash on the last line ends the value there."""
        self.assertEqual(values("a = x\\"), {"a": "x"})

    def test_line_number_is_the_first_physical_line(self) -> None:
        """Messages point at the line where a continued entry starts."""
        parsed = parse_properties("\n# c\na = 1\\\n  2\nb = 3\n")
        self.assertEqual(parsed["a"], ("12", 3))
        self.assertEqual(parsed["b"], ("3", 5))

    def test_line_endings(self) -> None:
        """CRLF, CR and LF all end lines; form feeds and U+2028 do not."""
        self.assertEqual(
            values("a = 1\r\nb = 2\rc = 3\nd = x\u2028y\n"),
            {"a": "1", "b": "2", "c": "3", "d": "x\u2028y"},
        )


class EscapeTests(SynchronousTestCase):
    def test_character_escapes(self) -> None:
        """\\t \\n \\r \\f become control characters; other escaped
        characters stand for themselves."""
        self.assertEqual(values("a = x\\ty\\nz\\r\\f\\q\\\\\n"), {"a": "x\ty\nz\r\fq\\"})

    def test_unicode_escape(self) -> None:
        """\\uXXXX (any case of hex digit) is the code point, in keys and values."""
        self.assertEqual(values("k\\u00e9y = caf\\u00E9 \\u20ac\n"), {"k\u00e9y": "caf\u00e9 \u20ac"})

    def test_malformed_unicode_escape(self) -> None:
        """A \\u without four hex digits is an error naming the line."""
        with self.assertRaises(PropertiesError) as caught:
            parse_properties("a = 1\nb = \\u12g4\n")
        self.assertIn("line 2", str(caught.exception))
        self.assertIn("\\uXXXX", str(caught.exception))

    def test_utf8_text_passes_through(self) -> None:
        """Non-ASCII text needs no escaping (the file is read as UTF-8)."""
        self.assertEqual(values("realm = Gerät\n"), {"realm": "Gerät"})


class ErrorTests(SynchronousTestCase):
    def test_duplicate_key(self) -> None:
        """A key set twice is an error naming the key and both lines."""
        with self.assertRaises(PropertiesError) as caught:
            parse_properties("a = 1\n\nb = 2\na = 3\n")
        message = str(caught.exception)
        self.assertIn("line 4", message)
        self.assertIn("a is already set on line 1", message)

    def test_duplicate_key_after_unescaping(self) -> None:
        """Two spellings of the same key (``\\u0061`` is ``a``) are a duplicate."""
        with self.assertRaises(PropertiesError):
            parse_properties("a = 1\n\\u0061 = 2\n")

    def test_value_without_key(self) -> None:
        """A line that starts with a separator has no key: an error."""
        with self.assertRaises(PropertiesError) as caught:
            parse_properties("a = 1\n= 2\n")
        self.assertIn("line 2", str(caught.exception))

    def test_empty_text(self) -> None:
        """An empty file has no keys (and is not an error here)."""
        self.assertEqual(parse_properties(""), {})
