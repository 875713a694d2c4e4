//! The cut, the rounds and the messages, on crafted candidates.

use super::*;

fn queued(size: i64) -> Candidate {
    Candidate {
        task_id: Uuid::new_v4(),
        size,
        running: false,
        attempt: 0,
    }
}

fn expired(attempt: i32) -> Candidate {
    Candidate {
        task_id: Uuid::new_v4(),
        size: 1000,
        running: true,
        attempt,
    }
}

/// (candidate, order, ends) of each pick.
fn shape(cut: &Cut) -> Vec<(usize, usize, bool)> {
    cut.picks
        .iter()
        .map(|p| (p.candidate, p.order, p.ends))
        .collect()
}

#[test]
fn orders_take_runs_of_the_oldest_tasks_in_turn_up_to_their_count() {
    let rooms = [Room::new(2, 1000), Room::new(3, 1000)];
    let candidates: Vec<_> = (0..6).map(|_| queued(10)).collect();

    let cut = cut(&rooms, &candidates, 5);

    assert_eq!(
        shape(&cut),
        [
            (0, 0, false),
            (1, 0, false),
            (2, 1, false),
            (3, 1, false),
            (4, 1, false)
        ]
    );
    assert!(cut.left_behind, "the sixth task had no order");
}

#[test]
fn a_byte_limit_ends_an_order_and_the_next_starts_where_it_stopped() {
    let rooms = [Room::new(10, 100), Room::new(10, 100)];
    let candidates = [queued(60), queued(30), queued(20), queued(90), queued(50)];

    let cut = cut(&rooms, &candidates, 5);

    // 60 + 30 fit the first order's 100 and 20 more would not; the
    // second takes 20, and 90 more would be past its 100: no order is
    // left, so 90 and 50 stay behind.
    assert_eq!(shape(&cut), [(0, 0, false), (1, 0, false), (2, 1, false)]);
    assert!(cut.left_behind);
}

#[test]
fn an_answer_holds_its_first_task_whatever_its_size() {
    let rooms = [Room::new(5, 100), Room::new(5, 100)];
    let candidates = [queued(500), queued(10), queued(700)];

    let cut = cut(&rooms, &candidates, 5);

    assert_eq!(shape(&cut), [(0, 0, false), (1, 1, false)]);
    assert!(cut.left_behind, "700 bytes fit neither order holding one");
}

#[test]
fn a_task_past_its_last_attempt_ends_and_takes_no_room() {
    let rooms = [Room::new(1, 100)];
    let candidates = [expired(5), expired(5), queued(10), queued(10)];

    let cut = cut(&rooms, &candidates, 5);

    assert_eq!(shape(&cut), [(0, 0, true), (1, 0, true), (2, 0, false)]);
    assert!(cut.left_behind);
}

#[test]
fn an_expired_lease_before_the_last_attempt_is_leased_again() {
    let rooms = [Room::new(1, 100)];

    let cut = cut(&rooms, &[expired(4)], 5);

    assert_eq!(shape(&cut), [(0, 0, false)]);
    assert!(!cut.left_behind);
}

#[test]
fn no_order_with_room_takes_nothing_and_leaves_everything_behind() {
    let mut full = Room::new(1, 100);
    full.take(10);

    let cut = cut(&[full], &[queued(1), expired(9)], 5);

    assert!(cut.picks.is_empty());
    assert!(cut.left_behind);
}

#[test]
fn every_candidate_taken_leaves_nothing_behind() {
    let cut = cut(&[Room::new(10, 1000)], &[queued(1), queued(2)], 5);

    assert_eq!(cut.picks.len(), 2);
    assert!(!cut.left_behind);
}

#[test]
fn picks_never_exceed_an_orders_count_or_bytes_beyond_its_first_task() {
    // Every combination of a few sizes and limits.
    let sizes = [1, 7, 50, 99, 100, 101, 400];
    for max_tasks in 1..4 {
        for max_bytes in [1, 100, 250] {
            for seed in 0..50usize {
                let candidates: Vec<_> = (0..12)
                    .map(|i| queued(sizes[(seed * 7 + i * 3 + i * i) % sizes.len()]))
                    .collect();
                let rooms = vec![Room::new(max_tasks, max_bytes); 3];
                let cut = cut(&rooms, &candidates, 5);
                for order in 0..3 {
                    let taken: Vec<i64> = cut
                        .picks
                        .iter()
                        .filter(|p| p.order == order)
                        .map(|p| candidates[p.candidate].size)
                        .collect();
                    assert!(taken.len() as i64 <= max_tasks);
                    if taken.len() > 1 {
                        assert!(taken.iter().sum::<i64>() <= max_bytes);
                    }
                }
                // The picks are a prefix of the candidates, in order.
                for (place, pick) in cut.picks.iter().enumerate() {
                    assert_eq!(pick.candidate, place);
                }
            }
        }
    }
}

#[test]
fn another_round_only_for_orders_with_room_after_a_skip_or_a_full_read() {
    let mut full = Room::new(1, 100);
    full.take(10);
    let open = Room::new(3, 100);
    let took_all = Cut::default();
    let cut_short = Cut {
        picks: Vec::new(),
        left_behind: true,
    };

    assert!(another_round(&[full, open], &took_all, true, false));
    assert!(another_round(&[open], &took_all, false, true));
    assert!(!another_round(&[open], &took_all, false, false));
    assert!(!another_round(&[full], &took_all, true, true));
    // A byte limit stopped the cut: the next read would start at the
    // task no order had room for.
    assert!(!another_round(&[open], &cut_short, false, true));
    // Unless picks were taken by someone else, which gives room back.
    assert!(another_round(&[open], &cut_short, true, true));
}

#[test]
fn rounds_go_on_while_orders_have_room_up_to_their_bounds() {
    let open = [Room::new(3, 100)];
    let took_all = Cut::default();
    let mut rounds = Rounds::default();

    assert_eq!(
        rounds.after(&open, &took_all, false, false),
        AfterRound::Done
    );
    for _ in 1..MAX_ROUNDS - 1 {
        assert_eq!(
            rounds.after(&open, &took_all, false, true),
            AfterRound::Again
        );
    }
    assert_eq!(
        rounds.after(&open, &took_all, false, true),
        AfterRound::GiveUp
    );
}

#[test]
fn contended_rounds_give_up_sooner() {
    let open = [Room::new(3, 100)];
    let mut rounds = Rounds::default();

    for _ in 1..MAX_CONTENDED_ROUNDS {
        assert_eq!(
            rounds.after(&open, &Cut::default(), true, false),
            AfterRound::Again
        );
    }
    assert_eq!(
        rounds.after(&open, &Cut::default(), true, false),
        AfterRound::GiveUp
    );
}

#[test]
fn only_a_lease_that_ran_out_gets_the_expiry_message() {
    assert_eq!(queued(10).message(5), None);
    assert_eq!(expired(2).message(5), Some(expired_message(2, 5)));
    assert_eq!(expired(5).message(5), Some(expired_message(5, 5)));
}

#[test]
fn candidates_wanted_counts_the_room_of_orders_not_full() {
    let mut full = Room::new(4, 100);
    full.take(100);

    assert_eq!(
        candidates_wanted(&[full, Room::new(3, 10), Room::new(2, 10)]),
        5
    );
}
