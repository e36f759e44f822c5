import FoundationEssentials
import Glibc
import QCowImage
import Synchronization

/// Progress on stderr for long work.
///
/// On a terminal: one line redrawn in place at most ten times a second — cleared first, fitted to
/// the terminal's width (never wrapped), the ETA as h:mm:ss once a few samples make it worth
/// showing. Without a terminal (`--progress` into a log): one plain line when the work starts, one
/// every few seconds, and one when it ends, each with the percentage and the rate.
final class ProgressReporter: @unchecked Sendable {
    let label: String
    private let terminal: Bool
    private let lock = Mutex(())
    private let start = Date()
    private var lastDraw = Date.distantPast
    private var samples = 0
    private var lineOpen = false
    private var last: (done: UInt64, total: UInt64) = (0, 0)

    /// Seconds between the plain lines written when stderr is not a terminal.
    static let logInterval: TimeInterval = 5
    /// The ETA appears once this many updates came in over at least `etaAfterSeconds`.
    static let etaAfterSamples = 5
    static let etaAfterSeconds: TimeInterval = 1

    init(label: String, terminal: Bool = isatty(STDERR_FILENO) != 0) {
        self.label = label
        self.terminal = terminal
    }

    deinit {
        // Work that failed never reached finish(): end the bar's line before the error line.
        if lineOpen { write("\n") }
    }

    func update(_ done: UInt64, _ total: UInt64) {
        lock.withLock { _ in record(done, total) }
    }

    private func record(_ done: UInt64, _ total: UInt64) {
        last = (done, total)
        samples += 1
        let now = Date()
        let interval = terminal ? 0.1 : Self.logInterval
        let first = lastDraw == .distantPast
        guard first || now.timeIntervalSince(lastDraw) >= interval || (terminal && done >= total) else { return }
        lastDraw = now
        draw(done, total, now: now)
    }

    /// The final state: the bar at its last value and a newline, or the closing plain line.
    func finish() {
        lock.withLock { _ in close() }
    }

    private func close() {
        if terminal {
            if lineOpen { write("\n") }
        } else {
            draw(last.done, max(last.total, last.done), now: Date(), final: true)
        }
        lineOpen = false
    }

    // MARK: - Drawing

    private func draw(_ done: UInt64, _ total: UInt64, now: Date, final: Bool = false) {
        let fraction = total == 0 ? 1 : min(1, Double(done) / Double(total))
        let elapsed = now.timeIntervalSince(start)
        let rate = elapsed > 0 ? Double(done) / elapsed : 0
        let percent = String(printf: "%5.1f%%", fraction * 100)
        let sizes = "\(humanSize(done))/\(humanSize(total))"
        let speed = "\(humanSize(UInt64(rate)))/s"
        let eta: String
        if done >= total {
            eta = "ETA 0:00:00"
        } else if samples >= Self.etaAfterSamples && elapsed >= Self.etaAfterSeconds && rate > 0 {
            eta = "ETA " + Self.clock(Double(total - done) / rate)
        } else {
            eta = "ETA -:--:--"
        }
        if !terminal {
            let when = final ? "done in \(Self.clock(elapsed))" : eta
            write("\(label): \(percent.drop { $0 == " " }) \(sizes), \(speed), \(when)\n")
            return
        }
        write("\r" + Self.fit(label: label, fraction: fraction, fields: [percent, sizes, speed, eta],
                              width: Self.terminalWidth() - 1) + "\u{1B}[K")
        lineOpen = true
    }

    /// "label [####    ] percent sizes rate ETA" in at most `width` columns: the bar shrinks first
    /// (to 10 columns), then the rate, the sizes and the ETA go in that order, then the bar, and
    /// what still does not fit is cut.
    static func fit(label: String, fraction: Double, fields: [String], width: Int) -> String {
        let dropOrder = [2, 1, 3]
        var dropped = Set<Int>()
        while true {
            let kept = fields.enumerated().filter { !dropped.contains($0.offset) }.map(\.element)
            let text = kept.joined(separator: " ")
            let room = width - label.count - text.count - 4  // " [" "] "
            if room >= 10 || dropped.count == dropOrder.count {
                let barWidth = max(0, min(40, room))
                let filled = min(barWidth, Int(fraction * Double(barWidth)))
                let bar = barWidth > 0
                    ? " [" + String(repeating: "#", count: filled) + String(repeating: " ", count: barWidth - filled) + "] "
                    : " "
                return String((label + bar + text).prefix(max(0, width)))
            }
            dropped.insert(dropOrder[dropped.count])
        }
    }

    /// h:mm:ss
    static func clock(_ seconds: Double) -> String {
        let s = seconds.isFinite ? max(0, Int(seconds.rounded())) : 0
        return String(printf: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60)
    }

    /// The terminal's columns (TIOCGWINSZ on stderr), else $COLUMNS, else 80.
    static func terminalWidth() -> Int {
        var size = winsize()
        if ioctl(STDERR_FILENO, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 { return Int(size.ws_col) }
        if let columns = ProcessInfo.processInfo.environment["COLUMNS"].flatMap(Int.init), columns > 0 { return columns }
        return 80
    }

    private func write(_ text: String) {
        standardError(text)
    }
}
