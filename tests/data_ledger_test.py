"""The ledger of consumed element ranges, and its audit."""

from absl.testing import absltest

from tfscale.data import ledger
from tfscale.data.dispatcher import types

SIZES = [10, 6, 8]
END = types.InputPosition(1)  # past epoch 0


class LedgerTest(absltest.TestCase):
    def _audit(self, ranges, position=END):
        book = ledger.Ledger(SIZES)
        book.add(ranges, position)
        return book.audit(position)

    def test_ranges_that_tile_every_shard_are_exact(self):
        (epoch,) = self._audit([(0, 0, 0, 4), (0, 1, 0, 6), (0, 0, 4, 10), (0, 2, 0, 8)])
        self.assertEqual(epoch, ledger.EpochAudit(0, True, 24, 0, 0, 0, 0))

    def test_overlaps_and_gaps_are_counted_per_element_and_shard(self):
        (epoch,) = self._audit([(0, 0, 0, 6), (0, 0, 4, 9), (0, 1, 0, 6), (0, 2, 2, 8)])
        self.assertEqual(epoch.duplicated_elements, 2)  # shard 0: 4 and 5 twice
        self.assertEqual(epoch.missing_elements, 1 + 2)  # shard 0: 9; shard 2: 0 and 1
        self.assertEqual((epoch.duplicated_shards, epoch.missing_shards), (1, 2))
        self.assertEqual(epoch.elements, 6 + 5 + 6 + 6)

    def test_the_current_epoch_is_audited_up_to_the_position(self):
        position = types.InputPosition(0, done=(1,), partials=((0, 3),))
        (epoch,) = self._audit([(0, 1, 0, 6), (0, 0, 0, 3)], position)
        self.assertEqual(epoch, ledger.EpochAudit(0, False, 9, 0, 0, 0, 0))
        # Elements past the position will be read again: they count as duplicated.
        (epoch,) = self._audit([(0, 1, 0, 6), (0, 0, 0, 5), (0, 2, 0, 1)], position)
        self.assertEqual((epoch.duplicated_elements, epoch.missing_elements), (3, 0))
        (epoch,) = self._audit([(0, 1, 0, 6)], position)
        self.assertEqual((epoch.missing_elements, epoch.missing_shards), (3, 1))

    def test_passed_epochs_keep_only_their_counts(self):
        book = ledger.Ledger(SIZES)
        book.add(
            [(0, s, 0, n) for s, n in enumerate(SIZES)] + [(1, 2, 0, 5)],
            types.InputPosition(1, partials=((2, 5),)),
        )
        state = book.to_dict()
        self.assertEqual(state["ranges"], [[1, 2, 0, 5]])
        self.assertEqual(len(state["closed"]), 1)
        resumed = ledger.Ledger(SIZES, state)
        resumed.add([(1, 2, 5, 8)], types.InputPosition(1, done=(2,)))
        audits = resumed.audit(types.InputPosition(1, done=(2,)))
        self.assertEqual(
            [(a.epoch, a.complete, a.elements) for a in audits], [(0, True, 24), (1, False, 8)]
        )
        self.assertEqual(sum(a.duplicated_elements + a.missing_elements for a in audits), 0)

    def test_adjacent_ranges_are_stored_joined(self):
        book = ledger.Ledger(SIZES)
        book.add([(0, 0, 0, 3), (0, 0, 3, 7), (0, 1, 0, 2)], types.InputPosition(0))
        self.assertEqual(book.to_dict()["ranges"], [[0, 0, 0, 7], [0, 1, 0, 2]])

    def test_a_range_outside_the_shards_is_refused_and_changes_nothing(self):
        book = ledger.Ledger(SIZES)
        for bad in [(0, 3, 0, 1), (0, 0, 5, 11), (0, 1, 4, 2)]:
            with self.assertRaisesRegex(ValueError, "must lie in a shard of the job"):
                book.add([(0, 0, 0, 1), bad], types.InputPosition(0))
        self.assertEqual(book.to_dict(), {"closed": [], "ranges": []})


if __name__ == "__main__":
    absltest.main()
