"""Each check prints one line; the last line counts them; any failure fails the run."""


class Report:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def ok(self, what):
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what):
        self.failed += 1
        print(f"  FAIL  {what}")

    def skip(self, what):
        self.skipped += 1
        print(f"  skip  {what}")

    def check(self, condition, what, why=""):
        """ok(what) if condition, else fail(what: why); returns condition."""
        if condition:
            self.ok(what)
        else:
            self.fail(f"{what}{': ' + why if why else ''}")
        return condition

    def summary(self):
        return (f"check-deploy: {self.passed} checks passed, {self.failed} failed, "
                f"{self.skipped} skipped")
