import ArgumentParser
import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// `--output human|json`, shared by every command that reports.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

/// Flags shared by every command: how to report, verbosity.
struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: "How to report: human or json (JSON goes to stdout).")
    var output: OutputFormat = .human

    @Flag(name: .long, help: "Log debug details to stderr.")
    var verbose = false

    @Flag(name: [.short, .long], help: "Print no informational output (a success summary); warnings and errors still go to stderr.")
    var quiet = false

    var json: Bool { output == .json }

    /// Informational output (a human success summary) on stdout, unless --quiet.
    func inform(_ text: String) {
        if !quiet { emit(text) }
    }

    /// A logger to stderr: debug with --verbose, else warnings only (`ReportLogHandler`).
    var logger: Logger {
        var logger = Logger(label: "qbackup") { _ in ReportLogHandler() }
        logger.logLevel = verbose ? .debug : .warning
        return logger
    }
}

/// The libraries' swift-log messages, printed as qbackup's own: a warning or worse is a
/// `qbackup: warning:` line (`warning()`, so it is also in the JSON report's "warnings"),
/// with the message's metadata in parentheses; with --verbose, lower levels are
/// `qbackup: debug:` (or info, notice) lines on stderr.
struct ReportLogHandler: LogHandler {
    var logLevel: Logger.Level = .warning
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = metadata.merging(metadataProvider?.get() ?? [:]) { $1 }.merging(event.metadata ?? [:]) { $1 }
        let details = all.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
        let text = details.isEmpty ? "\(event.message)" : "\(event.message) (\(details))"
        if event.level >= .warning {
            warning(text)
        } else {
            standardError("qbackup: \(event.level): \(text.replacing("\n", with: " "))\n")
        }
    }
}

/// `-p/--progress`, only on the commands that do long work (copy, compare, verify, merge).
struct ProgressOptions: ParsableArguments {
    @Flag(name: [.short, .long], inversion: .prefixedNo,
          help: "Show progress on stderr: a bar on a terminal, else a line every few seconds (default: on when stderr is a terminal).")
    var progress: Bool?

    /// A progress reporter, or nil when progress is off.
    func reporter(_ label: String) -> ProgressReporter? {
        let on = progress ?? (isatty(STDERR_FILENO) != 0)
        return on ? ProgressReporter(label: label) : nil
    }
}

/// `-U/--force-share`, only on the read-only commands (as qemu-img's -U): open images
/// without QEMU's image lock, so an image a VM or qemu-nbd holds can still be read.
struct ShareOptions: ParsableArguments {
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "Open the image without QEMU's lock, to read an image a VM or qemu-nbd holds (the data may be changing as it is read).")
    var forceShare = false

    /// Whether to take QEMU's image lock.
    var lock: Bool { !forceShare }

    /// With -U, one warning per image: what is read may be changing (naming the process that may be writing it).
    func warn(_ paths: [String]) {
        guard forceShare else { return }
        var seen: Set<String> = []
        for path in paths where seen.insert(path).inserted {
            // Byte 101 is QEMU's "write" permission lock: its holder may be writing the image.
            if let writer = LockHolder.of(path: path, byte: 101) {
                warning("\(path): read with -U/--force-share while \(writer) may be writing it: the data read may be changing")
            } else {
                warning("\(path): read with -U/--force-share, without QEMU's image lock: if a VM or qemu-nbd writes it meanwhile, the data read may be inconsistent")
            }
        }
    }
}
