import Foundation

/// A progress bar on stderr: bytes done of total, rate and ETA, redrawn at most ten times a second.
final class ProgressReporter {
    let label: String
    private let start = Date()
    private var lastDraw = Date.distantPast

    init(label: String) { self.label = label }

    func update(_ done: UInt64, _ total: UInt64) {
        let now = Date()
        guard now.timeIntervalSince(lastDraw) >= 0.1 || done >= total else { return }
        lastDraw = now
        let fraction = total == 0 ? 1 : Double(done) / Double(total)
        let width = 30
        let filled = Int(fraction * Double(width))
        let elapsed = now.timeIntervalSince(start)
        let rate = elapsed > 0 ? Double(done) / elapsed : 0
        let eta = rate > 0 && total > done ? Double(total - done) / rate : 0
        let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled)
        let line = String(format: "\r%@ [%@] %5.1f%% %@/%@ %@/s ETA %ds", label, bar, fraction * 100,
                          humanSize(done), humanSize(total), humanSize(UInt64(rate)), Int(eta))
        FileHandle.standardError.write(Data(line.utf8))
    }

    func finish() {
        FileHandle.standardError.write(Data("\n".utf8))
    }
}
