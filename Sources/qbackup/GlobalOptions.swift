import ArgumentParser
import Foundation
import Logging

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

    /// A logger to stderr: debug with --verbose, else warnings only.
    var logger: Logger {
        var logger = Logger(label: "qbackup") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = verbose ? .debug : .warning
        return logger
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
